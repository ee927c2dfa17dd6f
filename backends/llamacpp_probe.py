"""Open a GGUF with llama.cpp in a child process first, so that a native abort kills the child, not pocketlm.

llama.cpp answers some damaged files with GGML_ASSERT or an uncaught C++ exception: the process dies by SIGABRT
and Python cannot catch it. models/gguf_checks.py refuses the damage known to do that; this catches the rest. A
file that has never loaded on this machine (see models/verified_files.py) is opened here by
`python -P -m pocketlm.backends.llamacpp_probe PATH GPU_LAYERS THREADS`: load, a small context, one token tokenized
and decoded. Later loads of the same, unchanged file with the same llama.cpp skip it.

How the child ends decides what the user hears: a crash blames the file, a kill or an allocation failure blames
memory, a timeout blames neither; and where the probe itself could not run, the normal load goes ahead unprobed.
"""

from __future__ import annotations

import enum
import importlib.metadata
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from pocketlm.models.errors import ModelFileError, NotEnoughMemory, PocketError
from pocketlm.models.gguf_info import DAMAGED_MODEL_HINT
from pocketlm.models.native_child import ABORT_SIGNS, CRASH_SIGNALS, child_command, child_environment, shortened, signal_name

_log = logging.getLogger(__name__)

# Test seam: the module run as the child instead of this one (tests use ones that die by a signal, hang, fail to
# start, or count their runs before running this one). Never set in normal use.
PROBE_MODULE_ENV = "POCKETLM_LLAMACPP_PROBE_MODULE"
_THIS_MODULE = "pocketlm.backends.llamacpp_probe"
# The child's exit status when llama-cpp-python raised a Python exception: not a crash; the caller's own load
# will raise the same exception and report it as it always has.
PYTHON_ERROR_STATUS = 3
# Loading maps the file and decoding one token touches every weight once: minutes only for huge files on slow disks.
PROBE_TIMEOUT_S = 600
_PROBE_CONTEXT = 64
# The lines worth showing from the child's stderr, most telling first.
_NOTEWORTHY = (ABORT_SIGNS, re.compile(r"error|fatal|failed", re.IGNORECASE))
# What ggml and its GPU backends print when an allocation fails before they abort, most telling first (a bare CUDA
# error while opening a model is most often a failed allocation). Only the last lines count: the load log before them
# may mention other, harmless, failures.
_OUT_OF_MEMORY = (re.compile(r"out of memory|bad_alloc", re.IGNORECASE), re.compile(r"(failed|unable) to allocate|CUDA error", re.IGNORECASE))
_LAST_LINES = 8


class ProbeResult(enum.Enum):
    OPENED = "llama.cpp opened the file and decoded a token"
    REFUSED = "llama-cpp-python raised a Python exception, which the caller's own load will raise again"
    NOT_RUN = "the probe itself could not run (an interpreter or environment problem, not the file)"


def engine_key(gpu_layers: int, llama_cpp_version: str | None = None) -> str:
    """How a verified file was opened: another llama.cpp, or offloading to a GPU (which runs other code than the
    CPU), may die where this one did not, so each is probed. How many layers are offloaded does not matter."""
    if llama_cpp_version is None:
        try:  # the installed version, without importing llama_cpp (seconds, and a native library) to ask it
            llama_cpp_version = importlib.metadata.version("llama_cpp_python")
        except importlib.metadata.PackageNotFoundError:
            llama_cpp_version = "unknown"
    return f"llama.cpp {llama_cpp_version} {'gpu' if gpu_layers else 'cpu'}"


def ensure_llama_cpp_survives(model_path: Path, gpu_layers: int, threads: int) -> None:
    """Probe `model_path` in a child process unless this version of it has opened before.

    Raises a PocketError when the child dies or hangs: ModelFileError for a crash, NotEnoughMemory when it ran out
    of memory, a plain PocketError when it took too long or was stopped from outside. Where the probe could not run,
    or the verified-files database cannot be used, the load goes ahead (unprobed, or probed and not remembered).
    """
    from pocketlm.models.verified_files import FileIdentity, record_verified, was_verified

    try:
        identity = FileIdentity.of(model_path)
    except OSError:
        return  # vanished or unreadable since read_gguf: the load that follows says so in its own words
    engine = engine_key(gpu_layers)
    if was_verified(identity, engine):
        return
    if run_probe(model_path, gpu_layers, threads) is ProbeResult.OPENED:
        record_verified(identity, engine)


def run_probe(model_path: Path, gpu_layers: int, threads: int, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run the child and say how it went; raise the PocketError that explains its death if it died."""
    command = child_command(os.environ.get(PROBE_MODULE_ENV) or _THIS_MODULE, str(model_path), str(gpu_layers), str(threads))
    try:
        child = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=child_environment(), timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise PocketError(
            f"Opening {model_path.name} with llama.cpp took longer than {timeout_s:g} s, so it was stopped.",
            "The disk may be slow or busy; try again.",
        ) from None
    except OSError as error:
        _log.debug("the llama.cpp probe could not start (%s); loading %s unprobed", error, model_path)
        return ProbeResult.NOT_RUN
    if child.returncode == 0:
        return ProbeResult.OPENED
    if child.returncode == PYTHON_ERROR_STATUS:
        return ProbeResult.REFUSED
    if child.returncode > 0:  # the interpreter could not run the probe (a broken environment), not llama.cpp
        _log.debug("the llama.cpp probe exited with status %d (%s); loading %s unprobed",
                   child.returncode, _last_words(child.stderr), model_path)  # fmt: skip
        return ProbeResult.NOT_RUN
    raise _death_explained(model_path, -child.returncode, child.stderr, gpu_layers)


def _death_explained(model_path: Path, signal_number: int, stderr: bytes, gpu_layers: int) -> PocketError:
    """The error for a child killed by `signal_number`, judged by the signal and by what it printed last."""
    memory_hint = "Close other programs, or choose a smaller model or context (--ctx)" + (
        ", or offload fewer layers (--gpu-layers)." if gpu_layers else "."
    )
    if signal_number == signal.SIGKILL:  # what the kernel's out-of-memory killer sends
        return NotEnoughMemory(f"llama.cpp was killed while opening {model_path.name}, probably for lack of memory.", memory_hint)
    last_lines = _stderr_lines(stderr)[-_LAST_LINES:]
    if allocation := next((line for pattern in _OUT_OF_MEMORY for line in reversed(last_lines) if pattern.search(line)), None):
        return NotEnoughMemory(
            f"llama.cpp ran out of memory while opening {model_path.name} ({shortened(allocation)}).", memory_hint
        )
    if signal_number not in CRASH_SIGNALS:
        return PocketError(
            f"llama.cpp was stopped by {signal_name(signal_number)} while opening {model_path.name}.", "Try again."
        )
    return ModelFileError(
        f"llama.cpp crashed while opening {model_path.name} ({signal_name(signal_number)}: {_last_words(stderr)}); "
        "the file is probably damaged.",
        DAMAGED_MODEL_HINT,
    )


def _stderr_lines(stderr: bytes) -> list[str]:
    return [line.strip() for line in stderr.decode("utf-8", errors="replace").splitlines() if line.strip()]


def _last_words(stderr: bytes) -> str:
    """The child's own explanation: the last line naming an assertion or error, without build paths; else its last line."""
    lines = _stderr_lines(stderr)
    if not lines:
        return "no message"
    return shortened(next((line for pattern in _NOTEWORTHY for line in reversed(lines) if pattern.search(line)), lines[-1]))


def _probe(model_path: str, gpu_layers: int, threads: int) -> None:
    from llama_cpp import Llama

    from pocketlm.backends.llamacpp import LlamaCppBackend

    # verbose: llama-cpp-python otherwise points stderr at /dev/null while loading, and the assertion's text with it.
    settings = dict(model_path=model_path, n_ctx=_PROBE_CONTEXT, n_batch=_PROBE_CONTEXT, n_threads=threads,
                    n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=True)  # fmt: skip
    llm = LlamaCppBackend._create(Llama, settings)  # the backend's own recipe (flash attention, templates left out)
    tokens = llm.tokenize(b"Hello", add_bos=False, special=False) or [0]
    llm.eval(tokens[:1])
    llm.detokenize(tokens[:1])
    llm.close()


def main(argv: list[str]) -> int:
    model_path, gpu_layers, threads = argv[0], int(argv[1]), int(argv[2])
    try:
        _probe(model_path, gpu_layers, threads)
    except Exception as error:  # noqa: BLE001 - reported by the parent's own load, which raises it again
        print(f"llama-cpp-python raised {type(error).__name__}: {error}", file=sys.stderr)
        return PYTHON_ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
