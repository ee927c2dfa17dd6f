"""`pocketlm pull` as a real subprocess against the loopback Hub when things go wrong around it: killed with SIGKILL,
a disk that takes no more bytes, and two pulls of one file at once. Deadlines below only bound a hang."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from pocketlm.models.hub import hub_cache_dir
from pocketlm.models.locations import database_path
from pocketlm.models.store import ModelStore
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.fixtures import pocketlm_executable
from tests.hub.repos import GGUF_REPO, STARTER_FILE
from tests.hub.server import LoopbackHub, Transfer

STARTER_SIZE = 98_362_432
SPEC = f"{GGUF_REPO}:Q4_1"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        time.sleep(0.05)


def partial_file() -> Path | None:
    return next(hub_cache_dir().rglob("*.pocketlm-partial"), None)


def partial_size() -> int:
    partial = partial_file()
    return partial.stat().st_size if partial else 0


def leftovers(*folders: Path) -> list[Path]:
    """Temporaries a pull writes before a rename (`.NAME.PID.partial`, links, refs), and resumable downloads."""
    suffixes = (".partial", ".link", ".tmp", ".pocketlm-partial", ".incomplete")
    return [p for folder in folders for p in folder.rglob("*") if p.name.endswith(suffixes)]


def all_transfers_recorded(hub: LoopbackHub) -> bool:
    """The server records a transfer when it ends; a killed client's ends once the stall is released."""
    asked = [c for c in hub.api_calls if c.startswith("GET /cdn/") and c.endswith("/" + STARTER_FILE)]
    return len(hub.transfers_of(STARTER_FILE)) == len(asked)


def test_kill_9_during_a_pull_registers_nothing_and_the_next_pull_resumes(loopback_hub: LoopbackHub, pocket_home: Path) -> None:
    loopback_hub.stall_transfers(STARTER_FILE)
    child = subprocess.Popen([pocketlm_executable(), "pull", SPEC], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "POCKETLM_HOME": str(pocket_home)})  # fmt: skip
    try:
        wait_until(lambda: partial_size() >= 2**20, "a MiB is on disk")
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    loopback_hub.release_stalls()
    wait_until(lambda: all_transfers_recorded(loopback_hub), "the killed transfer is recorded")
    kept = partial_size()
    assert kept >= 2**20
    store = ModelStore(database_path())
    try:
        assert store.list() == []  # nothing registered by the killed pull
        earlier = len(loopback_hub.transfers_of(STARTER_FILE))

        resumed = pocketlm("pull", SPEC, home=pocket_home)
        assert resumed.returncode == 0, resumed.stderr
        assert loopback_hub.transfers_of(STARTER_FILE)[earlier:] == [Transfer(f"{GGUF_REPO}/{STARTER_FILE}", kept, STARTER_SIZE - kept)]
        model = store.get(SPEC)
        assert model is not None and model.path.is_file() and model.size_bytes == STARTER_SIZE
    finally:
        store.close()
    assert leftovers(hub_cache_dir(), pocket_home) == []


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_disk_that_takes_no_more_bytes_is_one_sentence_and_the_pull_resumes_later(loopback_hub: LoopbackHub, pocket_home: Path) -> None:
    limit = 8 * 2**20
    # A file-size limit makes every write past `limit` bytes fail as on a full disk (EFBIG; Python ignores SIGXFSZ).
    limited = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.argv[1], sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", limited, pocketlm_executable(), "pull", SPEC], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "POCKETLM_HOME": str(pocket_home)})  # fmt: skip
    assert_clean_failure(result, "Error: No room to write the download in")
    kept = partial_size()
    assert 0 < kept <= limit
    with closing(ModelStore(database_path())) as store:
        assert store.list() == []

    resumed = pocketlm("pull", SPEC, home=pocket_home)
    assert resumed.returncode == 0, resumed.stderr
    assert loopback_hub.transfers_of(STARTER_FILE)[-1].range_start == kept


def test_two_pulls_of_one_file_at_once_both_succeed_and_it_is_fetched_once(loopback_hub: LoopbackHub, pocket_home: Path) -> None:
    loopback_hub.stall_transfers(STARTER_FILE)  # the first pull holds the file's lock while the second one looks up
    env = {**os.environ, "POCKETLM_HOME": str(pocket_home)}
    pulls = [subprocess.Popen([pocketlm_executable(), "pull", SPEC], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    try:
        lookups = lambda: [c for c in loopback_hub.api_calls if c.startswith(f"GET /api/models/{GGUF_REPO}")]  # noqa: E731
        wait_until(lambda: len(lookups()) >= 2 and partial_size() >= 2**20, "both pulls have looked up the repo and one is fetching")
        loopback_hub.release_stalls()
        outcomes = [p.communicate(timeout=300) for p in pulls]
    finally:
        for p in pulls:
            p.kill()
    for p, (_, stderr) in zip(pulls, outcomes):
        assert p.returncode == 0, stderr
    # Whichever took the lock first fetched the file; the other found it complete. Resumes after a read timeout
    # start past 0, so exactly one transfer starts at 0.
    assert [t.range_start for t in loopback_hub.transfers_of(STARTER_FILE)].count(0) == 1
    with closing(ModelStore(database_path())) as store:
        [model] = store.list()
    assert model.name == SPEC
    content = model.path.read_bytes()
    assert hashlib.sha256(content).hexdigest() == loopback_hub.repos[GGUF_REPO].files[STARTER_FILE].sha256
    assert leftovers(hub_cache_dir(), pocket_home) == []
