"""Opening the store sweeps what killed processes left in the models folder, and never a live process's work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pocketlm.models.leftovers import converting_prefix, partial_name, sweep_leftovers
from pocketlm.models.locations import database_path, models_dir
from pocketlm.models.store import ModelStore


def dead_pid() -> int:
    """The id of a process that has exited (Linux hands out ids in increasing order, so it is not reused at once)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_dead_processs_work_goes_when_the_store_opens(pocket_home: Path) -> None:
    folder = models_dir()
    pid = dead_pid()
    work = folder / f"{converting_prefix(pid)}abc123"
    work.mkdir()
    (work / partial_name("f16.gguf", pid)).write_bytes(b"half a model")
    (folder / partial_name("model-Q4_K_M.gguf", pid)).write_bytes(b"half a model")
    (folder / "model-F16.gguf").write_bytes(b"a finished model stays")
    ModelStore(database_path()).close()
    assert names(folder) == ["model-F16.gguf"]


def test_a_live_processs_work_is_kept(pocket_home: Path) -> None:
    folder = models_dir()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            for pid in (os.getpid(), other.pid):
                (folder / f"{converting_prefix(pid)}xyz").mkdir()
                (folder / partial_name("model.gguf", pid)).write_bytes(b"in progress")
            assert sweep_leftovers(folder) == []
            ModelStore(database_path()).close()
            assert len(names(folder)) == 4
        finally:
            other.kill()


def test_working_folders_without_a_process_id_go_once_a_day_old(pocket_home: Path) -> None:
    # Before process ids were in the names (`.converting-<random>`), age is the only sign a folder was abandoned.
    folder = models_dir()
    old, recent = folder / ".converting-k2j4h5g6", folder / ".converting-a1b2c3d4"
    for work in (old, recent):
        work.mkdir()
        (work / "f16.gguf").write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old / "f16.gguf", (two_days_ago, two_days_ago))
    os.utime(old, (two_days_ago, two_days_ago))
    assert sweep_leftovers(folder) == [old]
    assert names(folder) == [recent.name]


def test_files_that_only_look_similar_are_kept(pocket_home: Path) -> None:
    folder = models_dir()
    kept = ["model.partial", ".model.gguf.partial", "model.gguf.123.partial", ".converting-notes.txt", ".model.gguf.pocketlm-partial"]
    for name in kept:
        (folder / name).write_bytes(b"not ours to delete")
    assert sweep_leftovers(folder) == []
    assert names(folder) == sorted(kept)


def test_a_missing_models_folder_is_no_error(tmp_path: Path) -> None:
    assert sweep_leftovers(tmp_path / "nowhere") == []


def test_an_output_a_dead_process_never_registered_goes_and_a_registered_one_stays(pocket_home: Path, starter_gguf: Path) -> None:
    import shutil

    from pocketlm.models.leftovers import registering_name

    folder, pid = models_dir(), dead_pid()
    orphan, registered = folder / "orphan-Q4_K_M.gguf", folder / "kept-Q4_K_M.gguf"
    orphan.write_bytes(b"a whole model nobody registered")
    shutil.copyfile(starter_gguf, registered)
    store = ModelStore(database_path())
    store.register(registered, source="convert", name="kept")
    store.close()
    for output in (orphan, registered):
        (folder / registering_name(output.name, pid)).touch()
    ModelStore(database_path()).close()
    assert names(folder) == ["kept-Q4_K_M.gguf"]
