"""What a converter is: one file turning models of some formats into another format, with progress and atomic output.

Each converter implements `Converter` and registers under the entry-point group `pocketlm.converters` (see
pyproject.toml), so GPTQ, MLX or a third-party format is one new file, as backends are.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from pocketlm.models.durable import NO_ROOM_ERRNOS, durable_replace, fsync_path
from pocketlm.models.errors import Cancelled, NotEnoughDisk, PocketError
from pocketlm.models.leftovers import aside_name, partial_name
from pocketlm.models.locations import models_dir
from pocketlm.models.progress import ProgressCallback


class ConversionError(PocketError):
    """The model cannot be converted as asked (unsupported architecture, missing file, bad option)."""


@dataclass(frozen=True)
class ConvertOptions:
    """What the user asked for that every converter understands; `settings` holds the target converter's own options
    (its `settings_type`: GGUFSettings, GPTQSettings, ...). None means that converter's defaults."""

    settings: object | None = None
    threads: int | None = None
    model_name: str | None = None  # the source's name, for metadata and progress (a Hub cache folder is only a commit)
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    how: str  # for the registry's lineage: "convert f16", "quantize Q4_K_M (imatrix)", "GPTQ 4-bit g128"


class Converter(Protocol):
    """One step from some formats to one format. The conversion job (conversion_job.py) chains steps to reach the
    format the user asked for, so each converter only knows its own step."""

    name: ClassVar[str]  # short id: "hf-to-gguf", "gguf-quantize", "gptq"
    source_formats: ClassVar[frozenset[str]]
    target_format: ClassVar[str]  # a ModelFormat value: "gguf", "gptq", "mlx"
    label: ClassVar[str]  # what users pick, in `--to` help and the Convert screen: "GPTQ 4-bit (transformers, vLLM)"
    summary: ClassVar[str]  # one line on size, quality and where the output runs, for the Convert screen
    output_is_folder: ClassVar[bool]  # a GGUF is one file; GPTQ and MLX checkpoints are folders
    install_hint: ClassVar[str]  # what to run when is_available() is False
    settings_type: ClassVar[type]  # its options dataclass; `settings_type()` are its defaults

    @classmethod
    def is_available(cls) -> bool:
        """Whether the libraries it needs are installed; must not import them (find_spec)."""
        ...

    @classmethod
    def quantizes(cls, settings: object) -> bool:
        """Whether this step, with these settings, writes a quantized model (so the job adds no quantize step after)."""
        ...

    @classmethod
    def output_label(cls, settings: object) -> str:
        """The suffix of the output's store name: "F16", "Q4_K_M", "GPTQ-4bit-g128"."""
        ...

    @classmethod
    def expected_size(cls, parameter_count: int, settings: object) -> int:
        """Bytes this step writes for a model of `parameter_count` weights, for the disk check before any work."""
        ...

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        """Write the converted model to `destination` (a file, or a folder when output_is_folder), through
        `atomic_output`: never leave a partial output there. Raises Cancelled soon after options.cancel is set."""
        ...


def settings_of(converter: type[Converter] | Converter, options: ConvertOptions) -> object:
    """The converter's own settings from `options`, its defaults when none were given."""
    wanted = converter.settings_type
    if options.settings is None:
        return wanted()
    if not isinstance(options.settings, wanted):
        raise ConversionError(f"The {converter.name} converter takes {wanted.__name__}, not {type(options.settings).__name__}.")
    return options.settings


@contextmanager
def atomic_output(destination: Path, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside `destination` (a file, or an empty folder when `folder`), renamed onto it only if the
    block finishes: Ctrl-C, an error or a full disk leave no half-written model behind, and an earlier output of the
    same name stays until the new one is whole."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    # The process id in the name tells the store's sweep (models/leftovers.py) whether a kill -9 left it behind.
    temporary = destination.with_name(partial_name(destination.name, os.getpid()))
    if folder:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    try:
        yield temporary
        if folder:
            _replace_folder(temporary, destination)
        else:
            durable_replace(temporary, destination)
    except OSError as error:
        # Disk full, over quota, over the file-size limit; numpy reports the same as a short write without an errno.
        short_write = error.errno is None and "written" in str(error)
        if error.errno in NO_ROOM_ERRNOS or short_write:
            raise NotEnoughDisk(f"There was no room to write {destination.name} ({error.strerror or error}); nothing was kept.",
                                "Free some space (or raise the limit) and run it again.") from None  # fmt: skip
        raise
    finally:
        if folder:
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def _replace_folder(temporary: Path, destination: Path) -> None:
    """Put the finished folder at `destination`. A folder cannot be renamed over another, so an old output is moved
    aside first (named after this process, so a kill -9 between the two renames is put back or swept at the next
    start) and deleted once the new one is in place.

    Which old output may be replaced is the conversion job's decision (only a registered earlier result of the same
    conversion); this is the last guard, for what no conversion may ever replace whatever it is told."""
    if destination.exists() or destination.is_symlink():
        refuse_replacing(destination)
    for file in temporary.rglob("*"):
        if file.is_file():
            fsync_path(file)
    fsync_path(temporary)
    aside = destination.with_name(aside_name(destination.name, os.getpid()))
    if destination.exists() or destination.is_symlink():
        os.replace(destination, aside)
    os.replace(temporary, destination)
    fsync_path(destination.parent)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def refuse_replacing(destination: Path) -> None:
    """Refuse a destination that holds more than one model's output: the models folder (or a folder above it), the
    home folder, a filesystem root, or a folder holding pocketlm's working names (another models folder)."""
    resolved = destination.resolve()
    guarded = {models_dir().resolve(), Path.home().resolve()}
    above_guarded = any(resolved == place or resolved in place.parents for place in guarded)
    holds_work = resolved.is_dir() and any(child.name.startswith((".converting-", ".elsewhere-")) for child in resolved.iterdir())
    if above_guarded or resolved == Path(resolved.anchor) or holds_work:
        raise ConversionError(f"{destination} is not a model's own folder; pocketlm never replaces it with an output.",
                              "Give --output a folder of its own, or another --name.")  # fmt: skip


def check_cancel(options: ConvertOptions) -> None:
    if options.cancel.is_set():
        raise Cancelled("Conversion cancelled; nothing was written.")
