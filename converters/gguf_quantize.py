"""Quantize a GGUF (f32/f16/bf16, or a higher quant) to Q8_0 … Q2_K, the K-quant mixes and IQ4_XS/IQ4_NL,
with llama.cpp's own quantizer through llama-cpp-python.

llama.cpp runs in a child process (converters/gguf_quantize_child.py): an abort on a damaged or odd GGUF kills the
child, not the CLI or the app, and a cancel kills it mid-file. This process keeps the checks, the atomic output, the
progress and the sentences; the child only reads the input and writes the temporary file it is given.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pocketlm.converters.base import ConversionError, ConversionResult, ConvertOptions, atomic_output, check_cancel, settings_of
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.quant_types import QUANT_TYPES, UNQUANTIZED_TYPES, QuantType, expected_size, quant_type
from pocketlm.models.errors import NotEnoughDisk, NotEnoughMemory, PocketError
from pocketlm.models.fit import physical_cores
from pocketlm.models.gguf_info import read_gguf
from pocketlm.models.leftovers import converting_prefix
from pocketlm.models.native_child import NativeChild, child_command, death_cause, signal_name
from pocketlm.models.progress import ProgressCallback, ProgressUpdate

if TYPE_CHECKING:
    from pocketlm.converters.importance_matrix import ImportanceMatrix

# Test seam: the module run as the child instead of the real one (tests use one that aborts). Never set in normal use.
CHILD_MODULE_ENV = "POCKETLM_QUANTIZE_CHILD_MODULE"
_CHILD_MODULE = "pocketlm.converters.gguf_quantize_child"
_QUANTIZE_FAILED_STATUS = 3  # gguf_quantize_child.QUANTIZE_FAILED_STATUS (not imported: that module is the child's)


class GGUFQuantizer:
    name: ClassVar[str] = "gguf-quantize"
    source_formats: ClassVar[frozenset[str]] = frozenset({"gguf"})
    target_format: ClassVar[str] = "gguf"
    label: ClassVar[str] = "GGUF (llama.cpp)"
    summary: ClassVar[str] = "llama.cpp's own quantizer: Q8_0 is practically lossless, Q4_K_M about a third of f16's size for a small loss."
    output_is_folder: ClassVar[bool] = False
    install_hint: ClassVar[str] = "Install it with: pip install 'pocketlm[llama]'"
    settings_type: ClassVar[type] = GGUFSettings

    @classmethod
    def is_available(cls) -> bool:
        return find_spec("llama_cpp") is not None

    @classmethod
    def quantizes(cls, settings: object) -> bool:
        return isinstance(settings, GGUFSettings) and settings.quant is not None

    @classmethod
    def output_label(cls, settings: object) -> str:
        return quant_type(_quant_of(settings)).name

    @classmethod
    def expected_size(cls, parameter_count: int, settings: object) -> int:
        return expected_size(parameter_count, quant_type(_quant_of(settings)))

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        settings: GGUFSettings = settings_of(self, options)  # type: ignore[assignment]
        quant = quant_type(_quant_of(settings))
        summary = read_gguf(source)  # refuses a damaged input before llama.cpp sees it
        if summary.quantization not in UNQUANTIZED_TYPES:
            raise ConversionError(
                f"{source.name} is already quantized ({summary.quantization}); quantizing it again would compound the loss.",
                "Quantize from the f16, bf16 or f32 GGUF (`pocketlm convert MODEL --to gguf` makes one from a checkpoint).",
            )
        matrix = settings.importance_matrix
        if matrix is None and settings.imatrix is not None:
            from pocketlm.converters.importance_matrix import read_imatrix_file

            if not str(settings.imatrix).endswith(".gguf"):
                raise ConversionError("A calibration text needs the checkpoint to compute the importance matrix from.",
                                      "Quantize through `pocketlm convert CHECKPOINT --quant ... --imatrix TEXT`, or give a llama-imatrix .gguf file.")  # fmt: skip
            matrix = read_imatrix_file(Path(settings.imatrix))  # a bad file is refused here, in this process's words
        check_cancel(options)
        threads = options.threads or physical_cores()
        description = f"Quantizing {options.model_name or source.name} to {quant.name}"
        on_progress(ProgressUpdate(description, 0, None))
        with atomic_output(destination) as temporary, _matrix_file(matrix, destination.parent) as matrix_path:
            child = _QuantizeChild(source, temporary, quant, threads, matrix_path)
            child.run(description, on_progress, options)
            if child.returncode != 0:
                raise _failure_explained(child, source, destination, quant)
            read_gguf(temporary)  # the output must be a whole, loadable file before it replaces anything
        return ConversionResult(destination, f"quantize {quant.name}" + (" (imatrix)" if matrix else ""))


def _quant_of(settings: object) -> str:
    if not isinstance(settings, GGUFSettings) or settings.quant is None:
        raise ConversionError("Quantizing needs a target type.", f"Choose one of {', '.join(QUANT_TYPES)}.")
    return settings.quant


@contextmanager
def _matrix_file(matrix: ImportanceMatrix | None, folder: Path) -> Iterator[str | None]:
    """The importance matrix as a numpy .npz (no pickle) in a working folder beside the output, named so that the
    store's sweep (models/leftovers.py) removes it if this process is killed."""
    if not matrix:
        yield None
        return
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=converting_prefix(os.getpid()), dir=folder) as working:
        path = Path(working) / "imatrix.npz"
        try:
            np.savez(path, **{name: np.ascontiguousarray(values, dtype=np.float32) for name, values in matrix.values.items()})
        except OSError as error:
            raise NotEnoughDisk(f"There was no room to write the importance matrix beside {folder} ({error.strerror or error}); nothing was kept.",
                                "Free some space (or raise the limit) and run it again.") from None  # fmt: skip
        yield str(path)


class _QuantizeChild:
    """One run of the child: its progress and problem lines, its last words on stderr, and how it ended."""

    def __init__(self, source: Path, output: Path, quant: QuantType, threads: int, matrix_path: str | None) -> None:
        self.child = NativeChild(child_command(os.environ.get(CHILD_MODULE_ENV) or _CHILD_MODULE, str(source), str(output), str(quant.ftype),
                                               str(threads), matrix_path or ""))  # fmt: skip
        self.problems: list[str] = []  # llama.cpp's warnings and errors, for the sentence if it fails

    @property
    def returncode(self) -> int | None:
        return self.child.returncode

    def run(self, description: str, on_progress: ProgressCallback, options: ConvertOptions) -> None:
        for line in self.child.lines(lambda: check_cancel(options)):
            kind, _, rest = line.partition(" ")
            if kind == "progress":
                done, total = rest.split()
                on_progress(ProgressUpdate(description, int(done), int(total)))
            elif kind == "problem":
                self.problems.append(rest)
        if self.child.start_error:
            raise ConversionError(f"Could not start llama.cpp's quantizer ({self.child.start_error}).", "Check that Python and pocketlm are installed whole.")
        check_cancel(options)  # a cancel that came as the child finished still discards the result

    def last_words(self) -> str:
        """Why it died: ggml's assertion on stderr if it printed one, else llama.cpp's last problem, else stderr's last line."""
        return self.child.last_words(self.problems[-1] if self.problems else None)


def _failure_explained(child: _QuantizeChild, source: Path, destination: Path, quant: QuantType) -> PocketError:
    returncode = child.returncode or 0
    cause = death_cause(returncode)
    if cause == "killed":
        return NotEnoughMemory(f"llama.cpp was killed while quantizing {source.name}, probably for lack of memory.",
                               "Close other programs and run it again.")  # fmt: skip
    if cause == "crashed":
        return ConversionError(
            f"llama.cpp crashed while quantizing {source.name} ({signal_name(-returncode)}: {child.last_words()}); the input may be damaged.",
            "Convert or download the f16 GGUF again, and quantize that.",
        )
    if cause == "stopped":
        return ConversionError(f"llama.cpp was stopped by {signal_name(-returncode)} while quantizing {source.name}.", "Run it again.")
    if returncode != _QUANTIZE_FAILED_STATUS:  # the interpreter could not run the child: not llama.cpp's answer
        return ConversionError(f"llama.cpp's quantizer could not run ({child.last_words()}).", "Check that pocketlm and llama-cpp-python are installed whole.")
    reason = next((p for p in reversed(child.problems) if not p.startswith("status ")), None) or child.last_words()
    # llama.cpp writes through a std::ofstream that throws on a failed write: a full disk, a quota or a
    # file-size limit surface as that stream's generic "iostream error" (its reads never use streams).
    if any(sign in reason.lower() for sign in ("space", "iostream error", "file too large", "quota")):
        return NotEnoughDisk(f"There was no room to write {destination.name} while quantizing to {quant.name}; nothing was kept.",
                             "Free some space (or raise the limit) and run it again.")  # fmt: skip
    return ConversionError(f"llama.cpp could not quantize {source.name} to {quant.name}: {reason}.",
                           "Check that the input is an f32, f16 or bf16 GGUF that llama.cpp loads.")  # fmt: skip

