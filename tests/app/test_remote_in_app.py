"""Remote endpoints in the app and the model commands: a row each on the Models screen, a choice in Chat's model
picker (Ctrl+O), an estimated context meter, and `pocketlm info|rm NAME`. The peer is a real OpenAI-compatible
server on loopback (tests/backends/openai_peer.py) answering with llama.cpp on the tiny GGUF."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from textual.widgets import DataTable, OptionList, Static

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.chat import ChatScreen
from pocketlm.app.screens.model_picker import ModelPicker
from pocketlm.app.widgets.status_line import StatusLine
from pocketlm.backends.base import SamplingParams
from pocketlm.models.locations import database_path
from pocketlm.models.remote_endpoints import RemoteEndpoint, RemoteEndpoints
from tests.app.test_chat_app import SIZE, send, wait_for
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.app.test_models_screen import notifications, open_models

PEER_KEY = "sk-peer-secret-789"


def add_endpoint(name: str, url: str, api_key_env: str = "") -> None:
    """Straight into the endpoints table, as `pocketlm remote add` leaves it (add itself asks the server first)."""
    endpoints = RemoteEndpoints(database_path())
    try:
        endpoints.add(RemoteEndpoint(name, url, api_key_env))
    finally:
        endpoints.close()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return unused.getsockname()[1]


def details(screen) -> str:  # type: ignore[no-untyped-def]
    return str(screen.query_one("#local-details", Static).render())


def displayed(table: DataTable) -> list[str]:
    return [str(table.get_row_at(row)[0]) for row in range(table.row_count)]


async def test_an_endpoint_is_a_row_of_the_models_screen_with_its_address_and_key_variable_then_opens_in_chat(
        peer_url: str, pocket_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("PEER_KEY", PEER_KEY)  # the peer takes any key; the screen must show its variable, never it
    add_endpoint("peer", peer_url, "PEER_KEY")
    app = PocketApp(default_sampling=SamplingParams(temperature=0, max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("escape")  # no stored model: decline the starter offer
        screen = await open_models(pilot)
        table = screen.query_one("#local-models", DataTable)
        row = [str(value) for value in table.get_row_at(0)]
        assert table.row_count == 1 and row[:2] == ["peer", "remote"] and row[-1] == peer_url
        await wait_for(pilot, lambda: "Serves: tiny (context 256)" in details(screen), timeout=30)
        shown = details(screen)
        assert f"URL: {peer_url}" in shown and "Key variable: $PEER_KEY (set)" in shown
        assert PEER_KEY not in shown

        screen.query_one("#local-models", DataTable).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))
        await wait_for(pilot, lambda: app.chat_screen.model is not None, timeout=30)
        assert app.chat_screen.model.description.backend == "remote"
        assert app.chat_screen.model.description.name == "peer"


async def test_a_silent_endpoint_does_not_hold_up_the_models_screen(pocket_home: Path) -> None:
    # A server that accepts connections and never answers: listing its models waits for the read timeout, so the
    # row and the details must come from the endpoints table alone.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        add_endpoint("silent", url)
        app = PocketApp()
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("escape")
            screen = await open_models(pilot)
            assert displayed(screen.query_one("#local-models", DataTable)) == ["silent"]
            shown = details(screen)
            assert f"URL: {url}" in shown and "Serves: asking the server…" in shown
            assert "Key variable: none" in shown
            silent.close()  # the waiting request ends (connection reset) and says so among the details
            await wait_for(pilot, lambda: "asking the server" not in details(screen), timeout=30)
            assert "silent (" + url + ")" in details(screen)


async def test_the_model_picker_offers_an_endpoint_and_loads_it_through_the_remote_backend(peer_url: str, pocket_home: Path) -> None:
    add_endpoint("peer", peer_url)
    app = PocketApp(default_sampling=SamplingParams(temperature=0, max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("escape")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelPicker))
        options = app.screen.query_one("#picker-models", OptionList)
        # What it serves comes from a worker: its one model is named on its line once the server has answered.
        await wait_for(pilot, lambda: "tiny" in str(options.get_option_at_index(0).prompt), timeout=30)
        assert str(options.get_option_at_index(0).prompt) == f"peer  remote · {peer_url} · tiny"
        options.focus()
        options.highlighted = 0
        await pilot.pause()
        assert app.screen.query_one("#picker-backend").value == "auto:remote"
        await pilot.press("enter")
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.model is not None, timeout=30)
        assert screen.model.description.backend == "remote"
        status = screen.query_one(StatusLine)
        assert f"peer · remote at {peer_url}" in status.render()
        await send(pilot, "hello")
        await wait_for(pilot, lambda: not screen.generating and screen.model is not None, timeout=60)
        await wait_for(pilot, lambda: status.context_used > 0)
        # The server's tokenizer is out of reach: the meter says its count is an estimate.
        assert f"context about {status.context_used}/256" in status.render()


async def test_an_unreachable_endpoint_chosen_in_the_picker_is_a_notification(closed_port: int, pocket_home: Path) -> None:
    add_endpoint("gone", f"http://127.0.0.1:{closed_port}/v1")
    app = PocketApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("escape")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ModelPicker))
        options = app.screen.query_one("#picker-models", OptionList)
        await wait_for(pilot, lambda: "not answering" in str(options.get_option_at_index(0).prompt), timeout=30)
        options.focus()
        options.highlighted = 0
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.chat_screen.loading, timeout=30)
        assert app.chat_screen.model is None
        assert any(f"gone (http://127.0.0.1:{closed_port}/v1) cannot be reached." in m for m in notifications(app))
        assert "no model loaded" in app.chat_screen.query_one(StatusLine).render()


def test_the_status_line_marks_an_estimated_context_count() -> None:
    status = StatusLine()
    status.context_used, status.context_length = 120, 4096
    assert "context 120/4096" in status.render()
    status.exact_token_counts = False
    assert "context about 120/4096" in status.render()


def test_info_on_an_endpoint_shows_its_address_key_variable_and_models(peer_url: str, pocket_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEER_KEY", PEER_KEY)
    add_endpoint("peer", peer_url, "PEER_KEY")
    shown = pocketlm("info", "peer", home=pocket_home)
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    assert "Name peer" in lines and "Format remote" in lines and f"URL {peer_url}" in lines
    assert "Key variable $PEER_KEY (set)" in lines and "Serves tiny (context 256)" in lines
    assert "not in the store" not in shown.stdout and PEER_KEY not in shown.stdout + shown.stderr
    one = pocketlm("info", "peer/tiny", home=pocket_home)
    assert one.returncode == 0 and "Model tiny" in [" ".join(line.split()) for line in one.stdout.splitlines()]


def test_info_on_an_unreachable_endpoint_says_so_in_a_sentence(closed_port: int, pocket_home: Path) -> None:
    url = f"http://127.0.0.1:{closed_port}/v1"
    add_endpoint("gone", url)
    shown = pocketlm("info", "gone", home=pocket_home)
    assert shown.returncode == 0, shown.stderr
    assert f"gone ({url}) cannot be reached." in shown.stdout and f"URL {url}" in " ".join(shown.stdout.split())
    assert "Traceback" not in shown.stderr


def test_rm_on_an_endpoint_points_to_remote_rm(closed_port: int, pocket_home: Path) -> None:
    add_endpoint("gone", f"http://127.0.0.1:{closed_port}/v1")
    assert_clean_failure(pocketlm("rm", "gone", "--yes", home=pocket_home), "pocketlm remote rm gone")
    assert "gone" in pocketlm("remote", "ls", home=pocket_home).stdout  # still configured
