"""kill -9 in the middle of convert, quantize and rm, then any command: nothing half-made is left in the store's
folder, and every registry entry has its files (a real `pocketlm` process, a real SIGKILL, a new process after)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pocketlm.models.store import ModelStore
from tests.app.test_cli import pocketlm
from tests.fixtures import pocketlm_executable

# Runs the CLI in this interpreter and SIGKILLs it at the first audit event (CPython's sys.addaudithook) named
# argv[1] whose first two arguments end with argv[2] and argv[3]: a kill -9 at an exact step, every time.
KILL_AT_EVENT = """
import os, signal, sys
event_name, first_end, second_end = sys.argv[1:4]
def hook(event, args):
    if event == event_name and str(args[0]).endswith(first_end) and str(args[1] if len(args) > 1 else "").endswith(second_end):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from pocketlm.app.cli import main
sys.argv = ["pocketlm", *sys.argv[4:]]
main()
"""


def environment(home: Path) -> dict[str, str]:
    return {**os.environ, "POCKETLM_HOME": str(home)}


def half_made(home: Path) -> list[str]:
    """Working folders and partial outputs in the store's models folder."""
    models = home / "models"
    return sorted(p.name for p in models.iterdir() if p.name.startswith(".converting-") or p.name.endswith(".partial"))


def kill_when(process: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path) -> None:
    """SIGKILL `process` as soon as `ready()` holds (checked every 10 ms; the work it waits for lasts seconds)."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"pocketlm ended (exit {process.returncode}) before the point to kill it at: {log.read_text()}"
        assert time.monotonic() < deadline, "the point to kill pocketlm at never came"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def start(home: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([pocketlm_executable(), *args], stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=environment(home))


def killed_at_event(home: Path, event: str, first_end: str, second_end: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-c", KILL_AT_EVENT, event, first_end, second_end, *args], capture_output=True, text=True,
                            timeout=600, env=environment(home))  # fmt: skip
    assert result.returncode == -signal.SIGKILL, f"pocketlm was not killed at {event}: {result.stderr}"
    return result


def assert_the_next_start_finds_a_consistent_store(home: Path, absent: str) -> None:
    """After the kill: `pocketlm ls` works, sweeps what was half made, lists nothing named `absent`, and every entry
    in the registry has all its files."""
    listed = pocketlm("ls", home=home)
    assert listed.returncode == 0, listed.stderr
    assert half_made(home) == []
    assert absent not in listed.stdout
    store = ModelStore(home / "pocketlm.sqlite3")
    try:
        missing = [(model.name, str(f)) for model in store.list() for f in model.files if not f.exists()]
    finally:
        store.close()
    assert missing == []


@pytest.fixture
def imported_checkpoint(starter_checkpoint: Path, pocket_home: Path) -> str:
    result = pocketlm("import", str(starter_checkpoint), "--name", "smol-checkpoint", home=pocket_home)
    assert result.returncode == 0, result.stderr
    return "smol-checkpoint"


def test_kill_9_while_convert_writes_the_f16_leaves_nothing_after_the_next_start(imported_checkpoint: str, pocket_home: Path, tmp_path: Path) -> None:
    log = tmp_path / "convert.log"
    models = pocket_home / "models"
    process = start(pocket_home, log, "convert", imported_checkpoint, "--quant", "Q4_K_M")
    kill_when(process, lambda: any(models.glob(".converting-*/.*.partial")), log)
    assert any(name.startswith(".converting-") for name in half_made(pocket_home)), "the kill must catch the conversion at work"
    assert_the_next_start_finds_a_consistent_store(pocket_home, "Q4_K_M")
    assert list(models.iterdir()) == []


def test_kill_9_while_quantize_writes_leaves_nothing_after_the_next_start(imported_f16: str, pocket_home: Path, tmp_path: Path) -> None:
    log = tmp_path / "quantize.log"
    models = pocket_home / "models"
    process = start(pocket_home, log, "quantize", imported_f16, "Q4_K_M")
    kill_when(process, lambda: any(models.glob(".*.partial")), log)
    assert any(name.endswith(".partial") for name in half_made(pocket_home)), "the kill must catch the quantizer at work"
    assert_the_next_start_finds_a_consistent_store(pocket_home, "Q4_K_M")
    assert list(models.iterdir()) == []


def test_kill_9_just_before_the_finished_output_is_renamed_leaves_no_entry(imported_f16: str, pocket_home: Path) -> None:
    # The whole Q4_K_M is written and fsync'ed; the kill comes at the rename that would put it in place.
    killed_at_event(pocket_home, "os.rename", ".partial", "Q4_K_M.gguf", "quantize", imported_f16, "Q4_K_M")
    assert half_made(pocket_home) != []
    assert_the_next_start_finds_a_consistent_store(pocket_home, "Q4_K_M")
    assert list((pocket_home / "models").iterdir()) == []


def test_kill_9_between_unregistering_and_deleting_leaves_no_entry_without_its_file(imported_f16: str, pocket_home: Path) -> None:
    quantized = pocketlm("quantize", imported_f16, "Q4_0", home=pocket_home)
    assert quantized.returncode == 0, quantized.stderr
    output = pocket_home / "models" / "smol-f16-Q4_0.gguf"
    assert output.is_file()
    killed_at_event(pocket_home, "os.remove", "smol-f16-Q4_0.gguf", "", "rm", "smol-f16:Q4_0", "-y")
    # The entry went first, so the file it named can only outlive it, never the reverse.
    assert_the_next_start_finds_a_consistent_store(pocket_home, "smol-f16:Q4_0")
    assert output.is_file()


def test_kill_9_between_the_rename_and_the_registration_leaves_no_model_without_an_entry(imported_f16: str, pocket_home: Path) -> None:
    # The Q4_K_M is in place under its final name; the kill comes as the registry opens it to record it.
    killed_at_event(pocket_home, "open", "smol-f16-Q4_K_M.gguf", "", "quantize", imported_f16, "Q4_K_M")
    assert (pocket_home / "models" / "smol-f16-Q4_K_M.gguf").is_file(), "the kill must come after the rename"
    assert_the_next_start_finds_a_consistent_store(pocket_home, "Q4_K_M")
    assert list((pocket_home / "models").iterdir()) == []


def test_ctrl_c_during_convert_stops_it_with_a_sentence_and_leaves_nothing(imported_checkpoint: str, pocket_home: Path, tmp_path: Path) -> None:
    log = tmp_path / "convert.log"
    models = pocket_home / "models"
    process = start(pocket_home, log, "convert", imported_checkpoint, "--quant", "Q4_K_M")
    deadline = time.monotonic() + 300
    while not any(models.glob(".converting-*/.*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 1, log.read_text()
    stderr = log.read_text()
    assert "Conversion interrupted; nothing was written." in stderr and "Traceback" not in stderr
    assert list(models.iterdir()) == [], "no working folder, partial output or registering mark is left"
    assert "Q4_K_M" not in pocketlm("ls", home=pocket_home).stdout


@pytest.fixture
def imported_tiny_checkpoint(tiny_llama: Path, pocket_home: Path) -> str:
    result = pocketlm("import", str(tiny_llama), "--name", "tiny", home=pocket_home)
    assert result.returncode == 0, result.stderr
    return "tiny"


def test_kill_9_as_a_finished_gptq_folder_is_renamed_leaves_no_folder_after_the_next_start(imported_tiny_checkpoint: str, pocket_home: Path) -> None:
    # The whole folder is written and flushed; the kill comes at the rename that would put it in place.
    killed_at_event(pocket_home, "os.rename", ".partial", "tiny-GPTQ-4bit-g32", "convert", imported_tiny_checkpoint, "--to", "gptq", "--group-size", "32")
    assert any(name.endswith(".partial") for name in half_made(pocket_home)), "the kill must catch the partial folder"
    assert_the_next_start_finds_a_consistent_store(pocket_home, "GPTQ")
    assert list((pocket_home / "models").iterdir()) == []


def test_kill_9_between_a_folders_rename_and_its_registration_leaves_no_folder(imported_tiny_checkpoint: str, pocket_home: Path) -> None:
    # The folder is in place under its final name; the kill comes as the registry reads it to record it.
    killed_at_event(pocket_home, "open", "tiny-GPTQ-4bit-g32/config.json", "r", "convert", imported_tiny_checkpoint, "--to", "gptq", "--group-size", "32")
    assert (pocket_home / "models" / "tiny-GPTQ-4bit-g32").is_dir(), "the kill must come after the rename"
    assert_the_next_start_finds_a_consistent_store(pocket_home, "GPTQ")
    assert list((pocket_home / "models").iterdir()) == []


def test_kill_9_while_a_gptq_folder_replaces_an_earlier_one_keeps_the_earlier_one(imported_tiny_checkpoint: str, pocket_home: Path) -> None:
    first = pocketlm("convert", imported_tiny_checkpoint, "--to", "gptq", "--group-size", "32", home=pocket_home)
    assert first.returncode == 0, first.stderr
    output = pocket_home / "models" / "tiny-GPTQ-4bit-g32"
    # The old folder is moved aside; the kill comes at the rename that would put the new one in its place.
    killed_at_event(pocket_home, "os.rename", ".partial", "tiny-GPTQ-4bit-g32", "convert", imported_tiny_checkpoint, "--to", "gptq", "--group-size", "32")
    assert not output.exists(), "the kill must come between the two renames"
    assert_the_next_start_finds_a_consistent_store(pocket_home, "GPTQ-absent-name")
    assert output.is_dir() and "tiny:GPTQ-4bit-g32" in pocketlm("ls", home=pocket_home).stdout
    assert sorted(p.name for p in (pocket_home / "models").iterdir()) == ["tiny-GPTQ-4bit-g32"]


def test_kill_9_while_writing_outside_the_models_folder_leaves_nothing_there_after_the_next_start(imported_tiny_checkpoint: str, pocket_home: Path,
                                                                                                   tmp_path: Path) -> None:  # fmt: skip
    elsewhere = tmp_path / "my-models"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("the user's own file stays")
    # The GGUF is whole; the kill comes at the rename that would put it in place, beside the user's file.
    killed_at_event(pocket_home, "os.rename", ".partial", "out.gguf", "convert", imported_tiny_checkpoint, "--output", str(elsewhere / "out.gguf"))
    left = sorted(p.name for p in elsewhere.iterdir())
    assert any(name.endswith(".partial") for name in left) and any(name.endswith(".registering") for name in left), left
    assert_the_next_start_finds_a_consistent_store(pocket_home, "F16")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]
    assert list((pocket_home / "models").iterdir()) == [], "the working folder and the mark naming the other folder are gone"
