"""Running llama.cpp in a child process, and reading how the child ended.

llama.cpp answers some inputs with GGML_ASSERT or an uncaught C++ exception, and the process dies by a signal that
Python cannot catch. The crash probe (backends/llamacpp_probe.py), the quantizer (converters/gguf_quantize.py) and the
bench's cells (app/bench_run.py) run it in a child so that only the child dies; they start it the same way and judge
its death by the same signs. NativeChild and die_with_parent are the two ends of the pipe the quantizer and the bench
share: the child dies with its parent, and a cancel kills it.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Literal

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


# --- The parent's side: a child whose stdin's end of file means "your parent is gone" ---------------------------------

# The child's status when it saw its parent die (die_with_parent): nobody is left to read what it would have said.
ORPHANED_STATUS = 4
# How often a silent child is checked for a cancel.
_CANCEL_POLL_S = 0.1
_STDERR_LINES_KEPT = 20

DeathCause = Literal["killed", "crashed", "stopped", "exited"]


def die_with_parent() -> None:
    """In the child: exit the moment stdin ends. The parent holds the only write end of that pipe, so its death closes
    it, however it died; os._exit because the main thread may be inside native code and cannot be interrupted."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(ORPHANED_STATUS)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def death_cause(returncode: int) -> DeathCause:
    """How a child ended, from its status: killed from outside by SIGKILL (most often the kernel's out-of-memory
    killer), crashed by its own native code (CRASH_SIGNALS), stopped by another signal, or exited with a status."""
    if returncode < 0 and -returncode == signal.SIGKILL:
        return "killed"
    if returncode < 0 and -returncode in CRASH_SIGNALS:
        return "crashed"
    return "stopped" if returncode < 0 else "exited"


class NativeChild:
    """One run of `command` in a child process: its stdout line by line, its last stderr lines, and how it ended.

    The child's stdin is a pipe only this process writes to: when this process dies, however, the child sees its end
    (die_with_parent). A child left running when its lines stop being read (a cancel, Ctrl-C, an error in the caller)
    is killed: nothing it was doing is kept.
    """

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.stderr: deque[str] = deque(maxlen=_STDERR_LINES_KEPT)
        self.returncode: int | None = None
        self.start_error = ""  # why the child could not start (OSError's words), "" when it did

    def lines(self, check_cancel: Callable[[], None], first_input: bytes = b"") -> Iterator[str]:
        """Start the child, give it `first_input` (its stdin stays open), and yield each non-empty line it prints on
        stdout; `check_cancel` runs while it is silent and stops it by raising. returncode is set once it ends."""
        try:
            process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=child_environment())  # fmt: skip
        except OSError as error:
            self.start_error = str(error)
            return
        lines: queue.Queue[str | None] = queue.Queue()
        readers = [threading.Thread(target=_read_lines, args=(process.stdout, lines.put, lambda: lines.put(None)), daemon=True),
                   threading.Thread(target=_read_lines, args=(process.stderr, self.stderr.append), daemon=True)]  # fmt: skip
        for reader in readers:
            reader.start()
        try:
            _send(process.stdin, first_input)
            while (line := _next_line(lines, check_cancel)) is not None:
                yield line
            self.returncode = process.wait()
        finally:
            if process.returncode is None:  # the caller stopped reading: the child's work is discarded
                process.kill()
                process.wait()
            assert process.stdin is not None
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass
            for reader in readers:
                reader.join()

    def last_words(self, fallback: str | None = None) -> str:
        """Why it died: ggml's assertion on stderr if it printed one, else `fallback`, else stderr's last line."""
        line = next((line for line in reversed(self.stderr) if ABORT_SIGNS.search(line)), None)
        return shortened(line or fallback or (self.stderr[-1] if self.stderr else "no message"))


def _send(stdin: IO[bytes] | None, data: bytes) -> None:
    assert stdin is not None
    if not data:
        return
    try:
        stdin.write(data)
        stdin.flush()  # stdin stays open: its end of file is what tells the child its parent is gone
    except BrokenPipeError:  # the child died at once; its stderr says why
        pass


def _read_lines(stream: IO[bytes] | None, keep: Callable[[str], object], at_end: Callable[[], object] = lambda: None) -> None:
    assert stream is not None
    with stream:
        for raw in stream:
            if line := raw.decode("utf-8", "replace").strip():
                keep(line)
    at_end()


def _next_line(lines: queue.Queue[str | None], check_cancel: Callable[[], None]) -> str | None:
    """The child's next stdout line (None at its end), checking for a cancel while it is silent."""
    while True:
        check_cancel()
        try:
            return lines.get(timeout=_CANCEL_POLL_S)
        except queue.Empty:
            continue
