"""Conversations in SQLite: what was streamed is stored, up to the last batch, even when the process is killed mid-reply."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from pocketlm.app.chat_session import reply
from pocketlm.app.history import ConversationStore
from pocketlm.backends.base import ChatMessage, ChatModel, GenerationStats, SamplingParams, TextPiece
from pocketlm.models.locations import database_path
from pocketlm.models.store import ModelStore
from tests.fixtures import pocketlm_executable


def test_conversations_crud(pocket_home: Path) -> None:
    history = ConversationStore(database_path())
    first = history.create(model="m", system_prompt="Be brief.", sampling=SamplingParams(temperature=0.2, seed=7, stop=("###",)))
    second = history.create(model="m")
    history.add_message(first.id, "user", "What is the tallest mountain on Earth, and how tall is it exactly?")
    history.add_message(first.id, "assistant", "Everest, 8,849 m.")
    stored = history.get(first.id)
    assert stored is not None
    assert stored.title == "What is the tallest mountain on Earth, and how…"
    assert stored.sampling == SamplingParams(temperature=0.2, seed=7, stop=("###",))
    assert [c.id for c in history.list()] == [first.id, second.id], "the chat with the latest message comes first"
    assert [m.role for m in history.chat_messages(first.id)] == ["system", "user", "assistant"]
    history.update(first.id, title="Mountains")
    assert history.get(first.id).title == "Mountains"  # type: ignore[union-attr]
    history.delete(first.id)
    assert history.get(first.id) is None and history.messages(first.id) == []
    history.close()


def test_reply_is_stored_in_batches_and_completed(pocket_home: Path, starter_model: ChatModel) -> None:
    history = ConversationStore(database_path())
    conversation = history.create(model=starter_model.description.name)
    shown = ""
    for event in reply(history, starter_model, conversation.id, "Name three colours.", SamplingParams(temperature=0, max_tokens=20)):
        if isinstance(event, TextPiece):
            shown += event.text
            user, streaming = history.messages(conversation.id)  # both rows exist from the start, in one transaction
            assert (user.content, streaming.status) == ("Name three colours.", "streaming")
            # Stored before it is shown, or in the next batch: never more than what was shown.
            assert shown.startswith(streaming.content)
        elif isinstance(event, GenerationStats):
            stats = event
    user, assistant = history.messages(conversation.id)
    assert (user.role, user.content, user.status) == ("user", "Name three colours.", "complete")
    assert (assistant.content, assistant.status) == (shown, "complete")
    assert assistant.tokens_per_second == stats.tokens_per_second


def test_killed_mid_reply_keeps_the_text_up_to_the_last_batch_marked_interrupted(store_with_starter: ModelStore, pocket_home: Path) -> None:
    process = subprocess.Popen(
        [pocketlm_executable(), "chat", "SmolLM2", "--max-tokens", "400", "--temp", "0.7", "--seed", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "POCKETLM_HOME": str(pocket_home)},
    )  # fmt: skip
    assert process.stdin and process.stdout
    process.stdin.write(b"Write a very long story about a dragon who learns to bake bread.\n")
    process.stdin.close()
    watcher = ConversationStore(database_path())  # in this process: the writer it sees is the child, alive
    deadline = time.monotonic() + 240
    while not any(m.role == "assistant" and m.content for c in watcher.list() for m in watcher.messages(c.id)):
        assert process.poll() is None, "the reply ended before the test could kill it"
        assert time.monotonic() < deadline, "no batch of the reply reached the database"
        time.sleep(0.05)
    (conversation,) = watcher.list()
    assert watcher.messages(conversation.id)[1].status == "streaming", "a live writer's reply is left alone"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    shown = process.stdout.read().decode("utf-8", errors="replace")
    watcher.close()

    history = ConversationStore(database_path())  # reopened after the crash: WAL recovery, no corruption
    assert history._connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    user, assistant = history.messages(conversation.id)
    assert user.content.startswith("Write a very long story about a dragon")
    assert assistant.status == "interrupted"
    assert assistant.content and shown.startswith(assistant.content), "what was streamed, up to the last batch"
    assert history._connection.execute("SELECT count(*) FROM messages WHERE status = 'streaming'").fetchone()[0] == 0
    assert history._connection.execute("SELECT count(*) FROM message_chunks").fetchone()[0] == 0
    assert history.chat_messages(conversation.id)[-1] == ChatMessage("assistant", assistant.content), "kept like a stopped reply"


def test_a_reply_that_never_started_is_left_out_with_its_question(pocket_home: Path) -> None:
    history = ConversationStore(database_path())
    conversation = history.create()
    history.add_message(conversation.id, "user", "first")
    history.add_message(conversation.id, "assistant", "", status="cancelled")
    history.add_message(conversation.id, "user", "second")
    history.add_message(conversation.id, "assistant", "partial answer", status="cancelled")
    history.add_message(conversation.id, "user", "third")
    history.add_message(conversation.id, "assistant", "", status="failed")
    assert history.chat_messages(conversation.id) == [ChatMessage("user", "second"), ChatMessage("assistant", "partial answer")]
