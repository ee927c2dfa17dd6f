"""What a converter is: one file turning models of some formats into another format, with progress and atomic output.

Each converter implements `Converter` and registers under the entry-point group `pocketlm.converters` (see
pyproject.toml), so GPTQ, MLX or a third-party format is one new file, as backends are.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from pocketlm.models.durable import NO_ROOM_ERRNOS, durable_replace
from pocketlm.models.errors import Cancelled, NotEnoughDisk, PocketError
from pocketlm.models.leftovers import partial_name
from pocketlm.models.progress import ProgressCallback


class ConversionError(PocketError):
    """The model cannot be converted as asked (unsupported architecture, missing file, bad option)."""


@dataclass(frozen=True)
class ConvertOptions:
    """What the user asked for. A converter ignores what does not apply to it."""

    outtype: str = "auto"  # the GGUF written from a checkpoint: f32, f16, bf16, q8_0; auto: bf16 for bf16 weights, else f16
    quant: str | None = None  # then quantized to this (Q4_K_M, IQ4_XS, ...)
    imatrix: str | None = None  # a calibration text file, "builtin", or a llama-imatrix GGUF file
    importance_matrix: dict[str, object] | None = field(default=None, compare=False, repr=False)  # computed from `imatrix`
    threads: int | None = None
    model_name: str | None = None  # for the GGUF's general.name (a Hub cache folder is only named by its commit)
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    how: str  # for the registry's lineage: "convert f16", "quantize Q4_K_M (imatrix)"


class Converter(Protocol):
    name: ClassVar[str]
    source_formats: ClassVar[frozenset[str]]
    target_format: ClassVar[str]

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        """Write the converted model to `destination`; never leave a partial file there."""
        ...


@contextmanager
def atomic_output(destination: Path) -> Iterator[Path]:
    """A temporary path beside `destination`, renamed onto it only if the block finishes: Ctrl-C, an error or a full
    disk leave no half-written model behind."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    # The process id in the name tells the store's sweep (models/leftovers.py) whether a kill -9 left it behind.
    temporary = destination.with_name(partial_name(destination.name, os.getpid()))
    try:
        yield temporary
        durable_replace(temporary, destination)
    except OSError as error:
        # Disk full, over quota, over the file-size limit; numpy reports the same as a short write without an errno.
        short_write = error.errno is None and "written" in str(error)
        if error.errno in NO_ROOM_ERRNOS or short_write:
            raise NotEnoughDisk(f"There was no room to write {destination.name} ({error.strerror or error}); nothing was kept.",
                                "Free some space (or raise the limit) and run it again.") from None  # fmt: skip
        raise
    finally:
        temporary.unlink(missing_ok=True)


def check_cancel(options: ConvertOptions) -> None:
    if options.cancel.is_set():
        raise Cancelled("Conversion cancelled; nothing was written.")
