"""llama.cpp's quantizer runs in a child process: its death cannot take pocketlm down, a cancel stops it mid-file,
and it does not outlive a pocketlm killed with -9."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pocketlm.converters.base import ConversionError, ConvertOptions
from pocketlm.converters.gguf_quantize import CHILD_MODULE_ENV, GGUFQuantizer
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.models.errors import Cancelled, NotEnoughMemory
from pocketlm.models.progress import ProgressUpdate, ignore_progress
from tests.converters.quantize_seams import PROBLEM
from tests.converters.test_kill_during_conversion import start

CHILD_NAME = "gguf_quantize_child"


@pytest.fixture
def seam(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run tests/converters/quantize_seams.py as the child, in the role given."""

    def play(role: str) -> None:
        monkeypatch.setenv(CHILD_MODULE_ENV, "tests.converters.quantize_seams")
        monkeypatch.setenv("POCKETLM_TEST_QUANTIZE_ROLE", role)
        # The child runs with -P (no working folder on sys.path), so the tests package must be found through PYTHONPATH.
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])))

    return play


def quantizer_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(CHILD_NAME in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def is_gone(pid: int) -> bool:
    """No process `pid` runs any more (a zombie waiting for a reaper that is not its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_quantizer_that_aborts_gives_the_crash_sentence_and_leaves_nothing(tiny_f16: Path, tmp_path: Path, seam) -> None:  # type: ignore[no-untyped-def]
    seam("abort")
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as crashed:
        GGUFQuantizer().convert(tiny_f16, out / "tiny-Q4_0.gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0")), ignore_progress)
    assert crashed.value.message == f"llama.cpp crashed while quantizing tiny.gguf (signal SIGABRT: {PROBLEM}); the input may be damaged."
    assert crashed.value.hint
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_quantizer_killed_by_sigkill_is_blamed_on_memory(tiny_f16: Path, tmp_path: Path, seam) -> None:  # type: ignore[no-untyped-def]
    seam("killed")
    with pytest.raises(NotEnoughMemory, match="killed while quantizing tiny.gguf, probably for lack of memory"):
        GGUFQuantizer().convert(tiny_f16, tmp_path / "out" / "tiny-Q4_0.gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0")), ignore_progress)
    assert list((tmp_path / "out").iterdir()) == []


def test_cancel_mid_quantization_kills_the_quantizer_and_keeps_nothing(converted_f16: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def cancel_at_tensor_three(update: ProgressUpdate) -> None:
        if (update.completed or 0) >= 3 and not cancel.is_set():
            seen.extend(child.pid for child in quantizer_children())
            cancel.set()

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        GGUFQuantizer().convert(converted_f16, out / "q.gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0"), cancel=cancel), cancel_at_tensor_three)
    assert len(seen) == 1, "the quantizer runs in one child process"
    assert not psutil.pid_exists(seen[0]), "the cancel must kill the quantizer, not wait for it to finish"
    assert list(out.iterdir()) == []


def test_cancel_reaches_a_quantizer_that_prints_nothing(tiny_f16: Path, tmp_path: Path, seam, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    seam("silent")
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("POCKETLM_TEST_QUANTIZE_PID_FILE", str(pid_file))
    cancel = threading.Event()

    def cancel_once_the_child_runs() -> None:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        cancel.set()

    canceller = threading.Thread(target=cancel_once_the_child_runs)
    canceller.start()
    try:
        with pytest.raises(Cancelled):
            GGUFQuantizer().convert(tiny_f16, tmp_path / "out" / "q.gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0"), cancel=cancel), ignore_progress)
    finally:
        canceller.join()
    assert pid_file.exists(), "the child never started"
    assert not psutil.pid_exists(int(pid_file.read_text()))
    assert list((tmp_path / "out").iterdir()) == []


def test_a_computed_importance_matrix_reaches_the_child_and_its_file_is_removed(tiny_f16: Path, tmp_path: Path) -> None:
    import gguf
    import numpy as np

    weights = [t for t in gguf.GGUFReader(tiny_f16).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    from pocketlm.converters.importance_matrix import ImportanceMatrix

    matrix = ImportanceMatrix({t.name: np.ones(int(t.shape[0]), dtype=np.float32) for t in weights})
    out = tmp_path / "out"
    result = GGUFQuantizer().convert(tiny_f16, out / "q.gguf", ConvertOptions(settings=GGUFSettings(quant="Q4_0", importance_matrix=matrix)), ignore_progress)
    assert result.how == "quantize Q4_0 (imatrix)"
    assert sorted(p.name for p in out.iterdir()) == ["q.gguf"]


def test_kill_9_of_pocketlm_while_quantizing_leaves_no_quantizer_running(imported_f16: str, pocket_home: Path, tmp_path: Path,
                                                                          seam, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # The stand-in never finishes on its own: only the parent's death, seen on its stdin, can end it.
    seam("silent")
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("POCKETLM_TEST_QUANTIZE_PID_FILE", str(pid_file))
    log = tmp_path / "quantize.log"
    process = start(pocket_home, log, "quantize", imported_f16, "Q4_K_M")
    deadline = time.monotonic() + 300
    while not pid_file.exists():
        assert process.poll() is None, f"pocketlm ended (exit {process.returncode}) before the quantizer ran: {log.read_text()}"
        assert time.monotonic() < deadline, "the quantizer never started"
        time.sleep(0.01)
    child = int(pid_file.read_text())
    assert child in [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 60  # a bound, not a measure: the child sees its stdin end at once
    while not is_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert is_gone(child), "the quantizer outlived the pocketlm that started it"
