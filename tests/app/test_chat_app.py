"""The chat app driven with Textual's Pilot against the real starter model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from textual.widgets import Input, ListView

from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.chat import ChatScreen
from pocketlm.app.screens.starter_offer import StarterOffer
from pocketlm.app.widgets.message_log import ChatMessageView
from pocketlm.app.widgets.prompt_input import PromptInput
from pocketlm.app.widgets.status_line import StatusLine
from pocketlm.backends.base import LoadOptions, SamplingParams
from pocketlm.models.store import ModelStore
from tests.fixtures import CONCISE_SYSTEM_PROMPT

SIZE = (120, 36)


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not condition():
            await pilot.pause(0.05)

    await asyncio.wait_for(poll(), timeout)


def greedy_app(max_tokens: int | None = 64) -> PocketApp:
    return PocketApp(load_options=LoadOptions(context_length=2048), default_sampling=SamplingParams(temperature=0, max_tokens=max_tokens))


async def send(pilot, text: str) -> None:  # type: ignore[no-untyped-def]
    prompt = pilot.app.screen.query_one(PromptInput)
    prompt.focus()
    prompt.text = text
    await pilot.press("enter")


def views(app: PocketApp) -> list[ChatMessageView]:
    return list(app.chat_screen.query(ChatMessageView))


async def start_a_long_reply(pilot) -> ChatScreen:  # type: ignore[no-untyped-def]
    """Wait for the model, ask for an essay, and return once the reply has visibly begun."""
    screen = pilot.app.chat_screen
    await wait_for(pilot, lambda: screen.model is not None)
    await send(pilot, "Write a very long essay about the history of bread.")
    await wait_for(pilot, lambda: len(views(pilot.app)) == 2 and len(views(pilot.app)[1].source) > 20)
    return screen


async def test_send_a_message_and_see_the_streamed_answer(store_with_starter: ModelStore) -> None:
    app = greedy_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.model is not None)
        status = screen.query_one(StatusLine)
        assert "SmolLM2-135M-Instruct · llama.cpp" in status.render()
        # The system prompt goes in through the settings dialog, as a user would set it.
        await send(pilot, "Hello")
        await wait_for(pilot, lambda: not screen.generating)
        await pilot.press("ctrl+s")
        dialog = app.screen
        dialog.query_one("#system-prompt").text = CONCISE_SYSTEM_PROMPT  # type: ignore[attr-defined]
        await pilot.click("#save")
        await pilot.press("ctrl+n")
        conversation = app.history.get(screen.conversation_id)  # type: ignore[arg-type]
        assert conversation is not None and conversation.system_prompt == ""  # a new chat starts from the defaults
        await pilot.press("ctrl+s")
        app.screen.query_one("#system-prompt").text = CONCISE_SYSTEM_PROMPT  # type: ignore[attr-defined]
        await pilot.click("#save")
        await send(pilot, "What is the capital of France?")
        assert screen.query_one(PromptInput).text == "", "the input clears on send"
        await wait_for(pilot, lambda: not screen.generating)
        user, answer = views(app)
        assert "capital of France" in user.source
        assert "Paris" in answer.source
        assert "tokens/s" in status.render() and "context " in status.render()
        stored = app.history.messages(screen.conversation_id)  # type: ignore[arg-type]
        assert [m.role for m in stored] == ["user", "assistant"] and stored[1].content == answer.source


async def test_stop_a_reply_midway(store_with_starter: ModelStore) -> None:
    app = greedy_app(max_tokens=None)
    async with app.run_test(size=SIZE) as pilot:
        screen = await start_a_long_reply(pilot)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.generating, timeout=10)
        assert screen.query_one(StatusLine).state == "stopped"
        (_, reply) = app.history.messages(screen.conversation_id)  # type: ignore[arg-type]
        assert reply.status == "cancelled" and len(reply.content) > 20
        assert views(app)[1].source.endswith("*(stopped)*")


async def test_new_rename_switch_and_delete_chats(store_with_starter: ModelStore) -> None:
    app = greedy_app(max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_for(pilot, lambda: screen.model is not None)
        await send(pilot, "First chat")
        await wait_for(pilot, lambda: not screen.generating)
        first_id = screen.conversation_id
        await pilot.press("ctrl+n")
        await send(pilot, "Second chat")
        await wait_for(pilot, lambda: not screen.generating)
        assert len(app.history.list()) == 2

        await pilot.press("f2")
        app.screen.query_one(Input).value = "Renamed"
        await pilot.press("enter")
        await pilot.pause()
        titles = [str(item.conversation.title) for item in screen.query_one(ListView).children]  # type: ignore[attr-defined]
        assert titles == ["Renamed", "First chat"]

        conversations = screen.query_one(ListView)
        conversations.focus()
        conversations.index = 1
        await pilot.press("enter")
        await pilot.pause()
        assert screen.conversation_id == first_id
        assert views(app)[0].source == "First chat"

        await pilot.press("f8")
        await pilot.click("#confirm")
        await pilot.pause()
        assert [c.title for c in app.history.list()] == ["Renamed"]
        assert views(app)[0].source == "Second chat"


async def test_empty_store_offers_and_fetches_the_starter(pocket_home: Path, starter_gguf: Path) -> None:
    app = greedy_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, StarterOffer)
        await pilot.click("#fetch")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), timeout=300)
        await wait_for(pilot, lambda: app.chat_screen.model is not None)
        assert app.store.get("SmolLM2-135M-Instruct") is not None
        assert (pocket_home / "models" / starter_gguf.name).stat().st_size == starter_gguf.stat().st_size


async def test_load_failure_is_a_notification(store_with_starter: ModelStore, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 10)
    app = PocketApp(model=str(broken))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: bool(app._notifications))
        (notification,) = list(app._notifications)
        assert "broken.gguf is truncated" in notification.message and notification.severity == "error"
        assert app.chat_screen.model is None


async def test_quitting_mid_reply_stops_it_and_keeps_it(store_with_starter: ModelStore) -> None:
    app = greedy_app(max_tokens=None)
    async with app.run_test(size=SIZE) as pilot:
        screen = await start_a_long_reply(pilot)
        conversation_id = screen.conversation_id
    # Leaving the block unmounted the app while the reply streamed: the model was freed only after the stream ended.
    assert screen.model is None
    (_, reply) = app.history.messages(conversation_id)  # type: ignore[arg-type]
    assert reply.status == "cancelled" and len(reply.content) > 20


async def test_an_interrupted_reply_is_shown_with_its_marker(pocket_home: Path, tmp_path: Path) -> None:
    from pocketlm.app.history import ConversationStore
    from pocketlm.models.locations import database_path

    history = ConversationStore(database_path())
    conversation = history.create()
    history.add_message(conversation.id, "user", "Tell me a story.")
    history.add_message(conversation.id, "assistant", "Once upon a time", status="interrupted")
    history.close()
    # No model is needed to read a conversation: name one that is not there.
    app = PocketApp(model=str(tmp_path / "absent.gguf"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: len(views(app)) == 2)
        assert views(app)[1].source == "Once upon a time  *(interrupted)*"
