"""Opening the store sweeps what killed processes left in the models folder, and never a live process's work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pocketlm.models.leftovers import aside_name, converting_prefix, partial_name, sweep_leftovers
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


def test_a_dead_processs_partial_folder_goes_and_a_live_ones_stays(pocket_home: Path) -> None:
    # A GPTQ or MLX output is written as a folder, `.name.<pid>.partial/`; an old output moved aside for its
    # replacement is `.name.<pid>.aside/`.
    folder = models_dir()
    dead = dead_pid()
    for name in (partial_name("tiny-GPTQ-4bit-g128", dead), aside_name("tiny-GPTQ-4bit-g128", dead), partial_name("live", os.getpid())):
        (folder / name).mkdir()
        (folder / name / "model.safetensors").write_bytes(b"half a model")
    ModelStore(database_path()).close()
    assert names(folder) == [partial_name("live", os.getpid())]


def test_a_folder_output_a_dead_process_never_registered_goes_and_a_registered_one_stays(pocket_home: Path) -> None:
    from pocketlm.models.leftovers import registering_name
    from tests.models.test_model_reference import small_checkpoint

    folder, pid = models_dir(), dead_pid()
    orphan = small_checkpoint(folder / "orphan-GPTQ-4bit-g128")
    registered = small_checkpoint(folder / "kept-GPTQ-4bit-g128")
    (registered / "quant_log.csv").write_text("an extra file the format does not list")
    store = ModelStore(database_path())
    store.register(registered, source="convert", name="kept", owned=True)
    store.close()
    for output in (orphan, registered):
        (folder / registering_name(output.name, pid)).touch()
    ModelStore(database_path()).close()
    assert names(folder) == ["kept-GPTQ-4bit-g128"]
    assert (registered / "quant_log.csv").is_file()


def test_a_dead_processs_work_outside_the_models_folder_goes_by_its_mark_and_nothing_else_there(pocket_home: Path, tmp_path: Path) -> None:
    from pocketlm.models.leftovers import ELSEWHERE_PREFIX, registering_name

    elsewhere, dead, other_dead = tmp_path / "my-models", dead_pid(), dead_pid()
    elsewhere.mkdir()
    (elsewhere / partial_name("out.gguf", dead)).write_bytes(b"half a model")
    (elsewhere / partial_name("gptq-out", dead)).mkdir()
    (elsewhere / aside_name("gptq-old", dead)).mkdir()  # not registered: swept, not put back
    (elsewhere / f"{converting_prefix(dead)}x1").mkdir()
    (elsewhere / "unregistered.gguf").write_bytes(b"finished, never registered")
    (elsewhere / registering_name("unregistered.gguf", dead)).touch()
    # Not that process's names: another dead process (whose mark, if any, is its own), and the user's own files.
    kept = [partial_name("x.gguf", other_dead), "notes.txt", ".hidden.partial", "mine.gguf"]
    for name in kept:
        (elsewhere / name).write_bytes(b"keep")
    (models_dir() / f"{ELSEWHERE_PREFIX}{dead}-abc").write_text(str(elsewhere))
    ModelStore(database_path()).close()
    assert names(elsewhere) == sorted(kept)
    assert names(models_dir()) == [], "the mark goes once its folder is swept"


def test_a_live_processs_mark_and_its_work_elsewhere_are_kept(pocket_home: Path, tmp_path: Path) -> None:
    from pocketlm.models.leftovers import working_elsewhere

    elsewhere = tmp_path / "out"
    elsewhere.mkdir()
    with working_elsewhere(elsewhere, models_dir()):
        (elsewhere / partial_name("out.gguf", os.getpid())).write_bytes(b"in progress")
        [mark] = models_dir().iterdir()
        assert mark.read_text() == str(elsewhere)
        ModelStore(database_path()).close()
        assert names(elsewhere) == [partial_name("out.gguf", os.getpid())]
    assert names(models_dir()) == []
