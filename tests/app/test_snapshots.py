"""Snapshots of the main screens (pytest-textual-snapshot). Update deliberately with --snapshot-update."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketlm.app.history import ConversationStore
from pocketlm.app.pocket_app import PocketApp
from pocketlm.backends.base import LoadOptions
from pocketlm.models.locations import database_path
from pocketlm.models.store import ModelStore

SIZE = (110, 32)


def seeded_conversations() -> None:
    history = ConversationStore(database_path())
    older = history.create(model="SmolLM2-135M-Instruct")
    history.add_message(older.id, "user", "Name three rivers in Europe.")
    history.add_message(older.id, "assistant", "The Danube, the Rhine and the Seine.")
    latest = history.create(model="SmolLM2-135M-Instruct", system_prompt="Answer in one short sentence.")
    history.add_message(latest.id, "user", "What is the capital of France?")
    history.add_message(latest.id, "assistant", "The capital of France is **Paris**.\n\n- population: about 2.1 million\n- river: the Seine")
    history.close()


async def wait_for_model(pilot) -> None:  # type: ignore[no-untyped-def]
    while pilot.app.chat_screen.model is None:
        await pilot.pause(0.05)
    pilot.app.chat_screen.query_one("#prompt").cursor_blink = False  # a blinking cursor makes two pictures of one screen
    await pilot.pause()


def test_chat_screen(snap_compare, store_with_starter: ModelStore) -> None:  # type: ignore[no-untyped-def]
    seeded_conversations()
    assert snap_compare(PocketApp(load_options=LoadOptions(context_length=2048)), terminal_size=SIZE, run_before=wait_for_model)


def test_chat_settings_dialog(snap_compare, store_with_starter: ModelStore) -> None:  # type: ignore[no-untyped-def]
    seeded_conversations()

    async def open_settings(pilot) -> None:  # type: ignore[no-untyped-def]
        await wait_for_model(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()

    assert snap_compare(PocketApp(load_options=LoadOptions(context_length=2048)), terminal_size=SIZE, run_before=open_settings)


def test_starter_offer(snap_compare, pocket_home: Path) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(PocketApp(), terminal_size=SIZE)


def test_models_screen_hub_search(snap_compare, store_with_starter: ModelStore, loopback_hub) -> None:  # type: ignore[no-untyped-def]
    from textual.widgets import DataTable

    async def search_the_hub(pilot) -> None:  # type: ignore[no-untyped-def]
        await wait_for_model(pilot)
        await pilot.press("f3", "ctrl+f", *"llama", "enter")
        table = pilot.app.screen.query_one("#hub-results", DataTable)
        while table.row_count == 0 or table.loading:
            await pilot.pause(0.05)
        await pilot.pause()

    assert snap_compare(PocketApp(load_options=LoadOptions(context_length=2048)), terminal_size=SIZE, run_before=search_the_hub)


def test_convert_screen_gptq_options(snap_compare, store_with_starter: ModelStore, tiny_llama: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from textual.widgets import Select

    store_with_starter.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")

    async def choose_gptq(pilot) -> None:  # type: ignore[no-untyped-def]
        await wait_for_model(pilot)
        await pilot.press("f4")
        while not pilot.app.screen.query("#convert-target"):
            await pilot.pause(0.05)
        pilot.app.screen.query_one("#convert-source", Select).value = "owner/tiny"
        pilot.app.screen.query_one("#convert-target", Select).value = "gptq"
        await pilot.pause()
        pilot.app.screen.query_one("#gptq-group-size", Select).value = 32
        await pilot.pause()

    assert snap_compare(PocketApp(load_options=LoadOptions(context_length=2048)), terminal_size=SIZE, run_before=choose_gptq)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC: a run's date on screen is then the same wherever the test runs."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_bench_screen_results_of_a_past_run(snap_compare, store_with_starter: ModelStore, utc: None) -> None:  # type: ignore[no-untyped-def]
    from tests.app.test_bench_screen import save_recorded_run

    save_recorded_run()  # fixed figures: the picture does not depend on this machine's speed

    async def show_the_past_run(pilot) -> None:  # type: ignore[no-untyped-def]
        await wait_for_model(pilot)
        await pilot.press("f6")
        while not pilot.app.screen.query("#bench-runs"):
            await pilot.pause(0.05)
        pilot.app.screen.query_one("#bench-tabs").active = "bench-past"
        await pilot.pause()
        pilot.app.screen.query_one("#bench-runs").focus()
        await pilot.press("enter")
        while pilot.app.screen.run is None:
            await pilot.pause(0.05)
        await pilot.pause()

    assert snap_compare(PocketApp(load_options=LoadOptions(context_length=2048)), terminal_size=SIZE, run_before=show_the_past_run)
