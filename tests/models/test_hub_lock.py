"""Waiting for another process's download of the same file: a message, a cancel that stops the wait at once, and a
limit to the patience with a holder that makes no progress. The holder is a real second process holding the lock."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pocketlm.models.errors import Cancelled, HubError
from pocketlm.models.hub import hub_cache_dir, repo_cache_dir
from pocketlm.models.progress import ProgressUpdate
from pocketlm.models.pull import PullPlan, parse_pull_spec, plan_pull, run_pull
from pocketlm.models.store import ModelStore
from tests.hub.repos import GGUF_REPO
from tests.hub.server import LoopbackHub

# A deadline that only bounds a hang: a cancelled wait returns within a poll (a quarter second) on any machine.
HANG_S = 60


@pytest.fixture
def plan(loopback_hub: LoopbackHub) -> PullPlan:
    return plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q8_0"))


@pytest.fixture
def lock_held_elsewhere(plan: PullPlan) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the download lock of the plan's file, as a pull in progress would."""
    storage = repo_cache_dir(GGUF_REPO)
    lock = storage.parent / ".locks" / storage.name / f"{plan.files[0].etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", f"from filelock import FileLock; lock = FileLock({str(lock)!r}); lock.acquire(); print('held', flush=True); input()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    yield holder
    holder.kill()
    holder.wait()


def test_a_pull_waiting_for_another_says_so_and_a_cancel_stops_it_at_once(
    plan: PullPlan, lock_held_elsewhere: subprocess.Popen[str], model_store: ModelStore
) -> None:
    cancel = threading.Event()
    descriptions: list[str] = []

    def on_progress(update: ProgressUpdate) -> None:
        descriptions.append(update.description)
        if update.description.startswith("Another pocketlm"):
            cancel.set()  # Ctrl+X in the app, Ctrl-C in the CLI

    started = time.monotonic()
    with pytest.raises(Cancelled, match="Stopped waiting for another pocketlm that is pulling SmolLM2-135M-Instruct-Q8_0.gguf"):
        run_pull(plan, model_store, on_progress, cancel)
    assert time.monotonic() - started < HANG_S
    assert "Another pocketlm is pulling SmolLM2-135M-Instruct-Q8_0.gguf; waiting…" in descriptions
    assert model_store.list() == []


def test_a_holder_that_makes_no_progress_is_given_up_on_with_a_sentence(
    plan: PullPlan, lock_held_elsewhere: subprocess.Popen[str], model_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pocketlm.models import hub_download

    monkeypatch.setattr(hub_download, "_LOCK_PATIENCE_S", 1)  # the default is minutes
    with pytest.raises(HubError, match="Another pocketlm has been pulling SmolLM2-135M-Instruct-Q8_0.gguf .* made no progress"):
        run_pull(plan, model_store)
    assert model_store.list() == []


def test_the_wait_ends_when_the_holder_lets_go(plan: PullPlan, lock_held_elsewhere: subprocess.Popen[str], model_store: ModelStore) -> None:
    def let_go_once_waiting(update: ProgressUpdate) -> None:
        if update.description.startswith("Another pocketlm"):
            lock_held_elsewhere.kill()  # a holder killed with SIGKILL: the system releases its lock

    model = run_pull(plan, model_store, let_go_once_waiting)
    assert model.path.is_file() and model_store.get(model.name) == model
    assert [p for p in hub_cache_dir().rglob("*") if p.name.endswith(".pocketlm-partial")] == []

