"""Running llama.cpp in a child process, and reading how the child ended.

llama.cpp answers some inputs with GGML_ASSERT or an uncaught C++ exception, and the process dies by a signal that
Python cannot catch. The crash probe (backends/llamacpp_probe.py) and the quantizer (converters/gguf_quantize.py) run
it in a child so that only the child dies; both start it the same way and judge its death by the same signs.
"""

from __future__ import annotations

import os
import re
import signal
import sys

# Signals by which native code dies of its own accord (an assertion, a bad pointer, a bad instruction): the input
# llama.cpp was given is the likely cause. Any other signal came from outside (SIGKILL: most often the OOM killer).
CRASH_SIGNALS = frozenset({signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS})
# What ggml prints on stderr as it aborts (it does not go through the log callback).
ABORT_SIGNS = re.compile(r"GGML_ASSERT|GGML_ABORT|terminate called|what\(\)")
_LONGEST_LINE = 200


def child_command(module: str, *arguments: str) -> list[str]:
    """The command running `module` in this interpreter. -P: `-m` would otherwise put the working folder first on
    sys.path, and a numpy.py or json.py lying there would be imported (and run) by the child; PYTHONPATH still counts."""
    return [sys.executable, "-P", "-m", module, *arguments]


def child_environment() -> dict[str, str]:
    """This process's environment, less ggml's habit of attaching gdb to print a backtrace on an abort (seconds)."""
    return {**os.environ, "GGML_NO_BACKTRACE": "1"}


def signal_name(signal_number: int) -> str:
    try:
        return f"signal {signal.Signals(signal_number).name}"
    except ValueError:
        return f"signal {signal_number}"


def shortened(line: str) -> str:
    """A line of the child's output fit for a sentence: build paths cut to the file name, at most 200 characters."""
    line = re.sub(r"(?:[^\s:]*/)+([^\s/:]+:\d+)", r"\1", line)  # /tmp/pip-…/src/llama-vocab.cpp:2544 → llama-vocab.cpp:2544
    return line if len(line) <= _LONGEST_LINE else line[: _LONGEST_LINE - 1] + "…"
