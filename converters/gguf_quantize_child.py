"""The child process that runs llama.cpp's quantizer, so that a native abort kills the child, not pocketlm.

`python -P -m pocketlm.converters.gguf_quantize_child SOURCE OUTPUT FTYPE THREADS [MATRIX]` quantizes SOURCE into
OUTPUT (the parent's temporary path) with llama.cpp's file type FTYPE; MATRIX, if given, is a numpy .npz of the
importance matrix (one float32 array per GGUF tensor name, read without pickle). On stdout it prints only lines for
the parent (converters/gguf_quantize.py): `progress DONE TOTAL` per tensor and `problem TEXT` for llama.cpp's
warnings and errors. It exits 0 when llama.cpp wrote the file, QUANTIZE_FAILED_STATUS when llama.cpp refused (the
problem lines say why), and at once when its stdin reaches end of file: the parent is gone, even by kill -9.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys

from pocketlm.models.native_child import die_with_parent

# llama_model_quantize returned non-zero: a refusal, not a crash; the parent explains it from the problem lines.
QUANTIZE_FAILED_STATUS = 3
_PROGRESS_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_WARN, _ERROR = 3, 4  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR


def say(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # the parent is gone; the stdin watcher ends this process
        pass


def read_matrix(path: str) -> dict[str, object]:
    import numpy as np

    with np.load(path, allow_pickle=False) as arrays:
        return {name: np.asarray(arrays[name], dtype=np.float32) for name in arrays.files}


def quantize(source: str, output: str, ftype: int, threads: int, matrix_path: str | None) -> int:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if not text:
            return
        if match := _PROGRESS_LINE.search(text):
            say(f"progress {int(match[1])} {int(match[2])}")
        elif level in (_WARN, _ERROR) and (line := " ".join(text.decode("utf-8", "replace").split())):
            say(f"problem {line}")

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))  # on_log stays referenced for the whole call below
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if matrix_path is None:
        status = llama_cpp.llama_model_quantize(source.encode(), output.encode(), ctypes.byref(params))
    else:
        from pocketlm.converters.importance_matrix import as_quantize_parameter

        with as_quantize_parameter(read_matrix(matrix_path)) as entries:  # type: ignore[arg-type]
            params.imatrix = entries
            status = llama_cpp.llama_model_quantize(source.encode(), output.encode(), ctypes.byref(params))
    if status != 0:
        say(f"problem status {status}")
        return QUANTIZE_FAILED_STATUS
    return 0


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group; the parent decides what it means and kills this child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    source, output, ftype, threads = argv[0], argv[1], int(argv[2]), int(argv[3])
    return quantize(source, output, ftype, threads, argv[4] if len(argv) > 4 and argv[4] else None)


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except BaseException:  # a Python error (not llama.cpp's): its traceback on stderr is what the parent shows
        import traceback

        traceback.print_exc()
        status = 1
    # os._exit, not a normal exit: the stdin watcher holds stdin's lock, and the interpreter's shutdown would abort
    # on it (SIGABRT, read by the parent as a crash).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
