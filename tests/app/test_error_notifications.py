"""Errors become one notification through app/notify.py: the sentence, the hint on its own line, shown as written
even when a name in it looks like markup."""

from __future__ import annotations

from pathlib import Path

from textual.app import App

from pocketlm.app.notify import notify_error, unexpected
from pocketlm.app.pocket_app import PocketApp
from pocketlm.models.errors import Cancelled, ModelNotFound
from pocketlm.models.store import ModelStore
from tests.app.test_chat_app import SIZE, wait_for
from tests.app.test_convert_screen import open_convert_screen
from tests.app.test_convert_targets import SOURCE, choose_gptq
from tests.app.test_markup_looking_names import toasts


async def test_an_error_naming_markup_is_shown_as_written_with_its_hint_below() -> None:
    app: App[None] = App()
    async with app.run_test(notifications=True) as pilot:
        notify_error(app, ModelNotFound("No model is named evil[/]name.", "Try [bold]x or a[link=http://x]b."), title="Not found")
        await wait_for(pilot, lambda: bool(toasts(app)), timeout=10)
        (shown,) = toasts(app)
        assert "No model is named evil[/]name.\nTry [bold]x or a[link=http://x]b." in shown
        (notification,) = app._notifications
        assert notification.severity == "error" and notification.title == "Not found"


async def test_a_cancel_is_a_warning_and_a_surprise_names_its_type_and_asks_for_a_report() -> None:
    app: App[None] = App()
    async with app.run_test(notifications=True) as pilot:
        notify_error(app, Cancelled("Stopped pulling x; 10 bytes are kept for next time."))
        notify_error(app, KeyError("[red]key"), title="The search")
        await wait_for(pilot, lambda: len(app._notifications) == 2, timeout=10)
        cancelled, surprise = app._notifications
        assert cancelled.severity == "warning"
        assert surprise.severity == "error"
        assert surprise.message == "The search failed unexpectedly: KeyError: '[red]key'.\nThis is a bug in pocketlm; please report it."
        assert unexpected("Loading", ValueError("")).message == "Loading failed unexpectedly: ValueError: no details."


async def test_a_conversion_error_naming_a_markup_looking_file_is_a_notification_as_written(tiny_store: ModelStore, tmp_path: Path) -> None:
    missing = tmp_path / "notes[/]for [b]me.txt"
    app = PocketApp()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        screen = await open_convert_screen(pilot, SOURCE)
        await choose_gptq(pilot, screen)
        screen.query_one("#gptq-calibration").value = str(missing)  # type: ignore[attr-defined]
        await pilot.click("#convert-start")
        await wait_for(pilot, lambda: not screen.running, timeout=120)
        await wait_for(pilot, lambda: any(str(missing) in t for t in toasts(app)), timeout=10)
        assert app.is_running and app.screen is screen
