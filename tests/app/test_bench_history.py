"""Benchmark runs in the store's SQLite file: saved whole, read back after a restart, listed newest first."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from pocketlm.app.bench_history import BenchHistory
from pocketlm.app.history import ConversationStore
from pocketlm.backends.base import SamplingParams
from pocketlm.backends.speed import SpeedSettings
from pocketlm.models.locations import database_path
from pocketlm.models.store import ModelStore
from tests.app.test_bench_report import sample_run, with_perplexity


def test_a_saved_run_reads_back_whole_after_reopening(pocket_home: Path) -> None:
    history = BenchHistory(database_path())
    saved = history.save(sample_run(run_id=None))
    history.close()
    assert saved.id is not None

    reopened = BenchHistory(database_path())
    assert reopened.get(saved.id) == saved == replace(sample_run(), id=saved.id)
    # Every repetition is kept, not only the spread: the figures can be recomputed and compared later.
    assert [len(r.speed.samples) for r in saved.results if r.speed] == [3, 3]
    assert saved.results[-1].error.startswith("broken.gguf is truncated") and saved.results[-1].speed is None
    assert reopened.get(saved.id + 1) is None
    reopened.close()


def test_runs_are_listed_newest_first(pocket_home: Path) -> None:
    history = BenchHistory(database_path())
    older = history.save(replace(sample_run(), started_at=1_700_000_000.0))
    newer = history.save(replace(sample_run(SpeedSettings(n_prompt=16, n_gen=8, repetitions=2)), started_at=1_800_000_000.0))
    assert [run.id for run in history.runs()] == [newer.id, older.id]
    assert [run.id for run in history.runs(limit=1)] == [newer.id]
    assert history.runs()[0].request.settings == SpeedSettings(n_prompt=16, n_gen=8, repetitions=2)
    history.close()


def test_deleting_a_run_deletes_its_results(pocket_home: Path) -> None:
    history = BenchHistory(database_path())
    kept, deleted = history.save(sample_run()), history.save(sample_run())
    history.delete(deleted.id)  # type: ignore[arg-type]
    assert [run.id for run in history.runs()] == [kept.id]
    history.close()
    with sqlite3.connect(database_path()) as connection:
        assert connection.execute("SELECT DISTINCT run_id FROM bench_results").fetchall() == [(kept.id,)]


def test_the_history_joins_an_existing_database_and_leaves_its_tables_alone(pocket_home: Path, tiny_llama: Path) -> None:
    # A database as an earlier pocketlm left it: models and conversations, no bench tables yet.
    store, conversations = ModelStore(database_path()), ConversationStore(database_path())
    store.register(tiny_llama, source="import:tiny", name="tiny")
    conversation = conversations.create(model="tiny", system_prompt="", sampling=SamplingParams())
    store.close()
    with sqlite3.connect(database_path()) as connection:
        versions_before = dict(connection.execute("SELECT component, version FROM schema_versions").fetchall())
    assert "bench" not in versions_before

    history = BenchHistory(database_path())
    saved = history.save(sample_run())
    history.close()
    with sqlite3.connect(database_path()) as connection:
        versions_after = dict(connection.execute("SELECT component, version FROM schema_versions").fetchall())
    assert versions_after == {**versions_before, "bench": 1}  # its migration, on a database that had none
    store = ModelStore(database_path())
    assert store.get("tiny") is not None and [c.id for c in conversations.list()] == [conversation.id]
    store.close()
    # Opening again migrates nothing and loses nothing.
    again = BenchHistory(database_path())
    assert again.get(saved.id) == saved  # type: ignore[arg-type]
    again.close()


def test_a_run_keeps_naming_a_model_removed_since(pocket_home: Path, tiny_llama: Path) -> None:
    store = ModelStore(database_path())
    store.register(tiny_llama, source="import:tiny", name="SmolLM2-135M-Instruct")
    history = BenchHistory(database_path())
    saved = history.save(sample_run())
    store.remove("SmolLM2-135M-Instruct")
    assert history.get(saved.id).results[0].cell.model == "SmolLM2-135M-Instruct"  # type: ignore[arg-type, union-attr]
    history.close()
    store.close()


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_perplexity_that_is_not_a_number_reads_back_as_measured(pocket_home: Path, value: float) -> None:
    run = with_perplexity(sample_run(run_id=None), value)
    history = BenchHistory(database_path())
    try:
        saved = history.get(history.save(run).id)  # type: ignore[arg-type]
    finally:
        history.close()
    assert saved is not None and saved.results[0].perplexity is not None, "measured, not 'not measured'"
    reread = saved.results[0].perplexity.value
    assert reread == value if math.isinf(value) else math.isnan(reread)
    assert saved.results[1].perplexity == run.results[1].perplexity and saved.results[2].perplexity is None


def test_a_failed_perplexity_is_kept_beside_the_speed(pocket_home: Path) -> None:
    run = sample_run(run_id=None)
    run = replace(run, results=(replace(run.results[0], perplexity=None, perplexity_error="The text is too short."), *run.results[1:]))
    history = BenchHistory(database_path())
    try:
        saved = history.get(history.save(run).id)  # type: ignore[arg-type]
    finally:
        history.close()
    assert saved == replace(run, id=saved.id)  # type: ignore[union-attr]
