"""Quantize a GGUF (f32/f16/bf16, or a higher quant) to Q8_0 … Q2_K, the K-quant mixes and IQ4_XS/IQ4_NL,
with llama.cpp's own quantizer through llama-cpp-python."""

from __future__ import annotations

import ctypes
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from pocketlm.converters.base import ConversionError, ConversionResult, ConvertOptions, atomic_output, check_cancel
from pocketlm.converters.quant_types import QUANT_TYPES, UNQUANTIZED_TYPES, quant_type
from pocketlm.models.errors import NotEnoughDisk
from pocketlm.models.fit import physical_cores
from pocketlm.models.gguf_info import read_gguf
from pocketlm.models.progress import ProgressCallback, ProgressUpdate


_PROGRESS_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


class GGUFQuantizer:
    name: ClassVar[str] = "gguf-quantize"
    source_formats: ClassVar[frozenset[str]] = frozenset({"gguf"})
    target_format: ClassVar[str] = "gguf"

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        import llama_cpp

        if options.quant is None:
            raise ConversionError("Quantizing needs a target type.", f"Choose one of {', '.join(QUANT_TYPES)}.")
        quant = quant_type(options.quant)
        summary = read_gguf(source)  # refuses a damaged input before llama.cpp sees it
        if summary.quantization not in UNQUANTIZED_TYPES:
            raise ConversionError(
                f"{source.name} is already quantized ({summary.quantization}); quantizing it again would compound the loss.",
                "Quantize from the f16, bf16 or f32 GGUF (`pocketlm convert MODEL --to gguf` makes one from a checkpoint).",
            )
        matrix = options.importance_matrix
        if matrix is None and options.imatrix is not None:
            from pocketlm.converters.importance_matrix import read_imatrix_file

            if not str(options.imatrix).endswith(".gguf"):
                raise ConversionError("A calibration text needs the checkpoint to compute the importance matrix from.",
                                      "Quantize through `pocketlm convert CHECKPOINT --quant ... --imatrix TEXT`, or give a llama-imatrix .gguf file.")  # fmt: skip
            matrix = read_imatrix_file(Path(options.imatrix))
        check_cancel(options)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = quant.ftype
        params.nthread = options.threads or physical_cores()
        description = f"Quantizing {options.model_name or source.name} to {quant.name}"
        on_progress(ProgressUpdate(description, 0, None))
        with atomic_output(destination) as temporary, _importance(matrix) as importance, _progress_from_log(description, on_progress) as log:
            if importance is not None:
                params.imatrix = importance
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(temporary).encode(), ctypes.byref(params))
            # llama.cpp's quantizer cannot be interrupted; a cancel during it discards the result as it ends.
            check_cancel(options)
            if status != 0:
                reason = log.problems[-1] if log.problems else f"status {status}"
                # llama.cpp writes through a std::ofstream that throws on a failed write: a full disk, a quota or a
                # file-size limit surface as that stream's generic "iostream error" (its reads never use streams).
                if any(sign in reason.lower() for sign in ("space", "iostream error", "file too large", "quota")):
                    raise NotEnoughDisk(f"There was no room to write {destination.name} while quantizing to {quant.name}; nothing was kept.",
                                        "Free some space (or raise the limit) and run it again.")  # fmt: skip
                raise ConversionError(f"llama.cpp could not quantize {source.name} to {quant.name}: {reason}.",
                                      "Check that the input is an f32, f16 or bf16 GGUF that llama.cpp loads.")  # fmt: skip
            read_gguf(temporary)  # the output must be a whole, loadable file before it replaces anything
        return ConversionResult(destination, f"quantize {quant.name}" + (" (imatrix)" if matrix else ""))


@contextmanager
def _importance(matrix: dict | None):  # type: ignore[no-untyped-def, type-arg]
    if not matrix:
        yield None
        return
    from pocketlm.converters.importance_matrix import as_quantize_parameter

    with as_quantize_parameter(matrix) as entries:  # type: ignore[arg-type]
        yield entries


_log_lock = threading.Lock()


class _progress_from_log:
    """llama.cpp reports each tensor it quantizes in its log ("[  12/ 272] blk.0.attn_q.weight ..."); turn those
    lines into progress, and keep its chatter off the terminal. The log callback is process-wide, hence the lock."""

    def __init__(self, description: str, on_progress: ProgressCallback) -> None:
        self.description, self.on_progress = description, on_progress
        self.problems: list[str] = []  # llama.cpp's warnings and errors, for the sentence if it fails

    def __enter__(self) -> _progress_from_log:
        import llama_cpp

        @llama_cpp.llama_log_callback
        def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if not text:
                return
            if match := _PROGRESS_LINE.search(text):
                self.on_progress(ProgressUpdate(self.description, int(match[1]), int(match[2])))
            elif level in (3, 4) and (line := text.decode("utf-8", "replace").strip()):  # GGML_LOG_LEVEL_WARN, _ERROR
                self.problems.append(line)

        self._callback = on_log  # keep a reference: llama.cpp holds only the pointer
        _log_lock.acquire()
        try:
            llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        except BaseException:
            _log_lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import llama_cpp
        from llama_cpp import _logger

        try:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own, back
        finally:
            _log_lock.release()
