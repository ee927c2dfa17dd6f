"""`pocketlm serve` started and stopped from inside the app (the command palette's Serve), driven with Textual's Pilot,
answering the real `openai` client on loopback, with the header saying where it listens and how many it answered."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import openai

from pocketlm.app.pocket_app import PocketApp
from pocketlm.models.store import ModelStore
from tests.backends.tiny_gguf import tiny_llama_gguf_path

SIZE = (120, 40)
TINY = "tiny"


async def _until(pilot, condition, seconds: float = 60) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds * 10)):
        if condition():
            return
        await pilot.pause(0.1)
    raise AssertionError("the app never got there")


async def _palette(pilot, command: str) -> None:  # type: ignore[no-untyped-def]
    await pilot.press("ctrl+p")
    await pilot.pause()
    await pilot.press(*command)
    await pilot.pause(0.5)
    await pilot.press("enter")
    await pilot.pause()


def _ask(base_url: str) -> openai.types.Completion:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return client.completions.create(model=TINY, prompt="the cat", temperature=0, max_tokens=4)


def _accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def test_serve_from_the_palette_answers_a_client_counts_it_and_stops(model_store: ModelStore, pocket_home: Path) -> None:
    model_store.register(tiny_llama_gguf_path(), source="test", name=TINY)
    app = PocketApp(serve_port=0)
    async with app.run_test(size=SIZE) as pilot:
        assert app.server is None and app.sub_title == ""
        await _palette(pilot, "Serve")
        assert app.server is not None, "the palette's Serve did not start the server"
        server = app.server
        assert server.url.startswith("http://127.0.0.1:") and server.port != 0
        await _until(pilot, lambda: app.sub_title == f"Serving on {server.url} — 0 requests")

        reply = await asyncio.to_thread(_ask, f"{server.url}/v1")
        assert reply.usage.completion_tokens == 4
        await _until(pilot, lambda: app.sub_title == f"Serving on {server.url} — 1 request")

        await _palette(pilot, "Stop serving")
        assert app.server is None and app.sub_title == ""
        assert not server.running and not _accepts_connections(server.port)


async def test_a_port_in_use_is_a_notification_not_a_crash(model_store: ModelStore, pocket_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = PocketApp(serve_port=taken.getsockname()[1])
        async with app.run_test(size=SIZE) as pilot:
            app.action_toggle_serve()
            await pilot.pause()
            assert app.server is None and app.sub_title == ""
            assert any("Cannot listen on 127.0.0.1" in str(n.message) for n in app._notifications)
