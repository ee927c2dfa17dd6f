"""The chat history's durability without a model: batched writes, interrupted replies, and the schema migration."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from pocketlm.app.history import BATCH_SECONDS, ConversationStore
from pocketlm.backends.base import ChatMessage, GenerationStats
from pocketlm.models.locations import database_path


class SteppingClock:
    """A clock that moves `step` seconds each time it is read: a model streaming at a steady pace, without sleeping."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def count_statements(history: ConversationStore) -> list[str]:
    """Every SQL statement the store runs from now on."""
    statements: list[str] = []
    history._connection.set_trace_callback(statements.append)
    return statements


def test_a_2000_piece_reply_costs_one_write_per_batch(pocket_home: Path) -> None:
    history = ConversationStore(database_path())
    conversation = history.create()
    pieces = [f"word{i} " for i in range(2000)]
    clock = SteppingClock(0.01)  # 100 pieces a second: 20 s of streaming
    writer = history.begin_reply(conversation.id, "Tell me everything.", clock=clock)
    statements = count_statements(history)
    for piece in pieces:
        writer.write(piece)
    stats = GenerationStats(prompt_tokens=5, generated_tokens=2000, time_to_first_token_s=0.1, generation_s=20, stop_reason="max_tokens")
    writer.finish("complete", stats)
    history._connection.set_trace_callback(None)

    batches = round(2000 * clock.step / BATCH_SECONDS)  # 80
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))]
    assert len(writes) <= batches + 3, f"{len(writes)} writes for {batches} batches"
    assert len(writes) >= batches // 2, "the reply was written as it streamed, not only at the end"
    # Each batch is a row of its own: no statement rewrites the growing reply ("content || ?" once per batch would).
    assert sum("content = content ||" in s for s in writes) == 1
    user, reply = history.messages(conversation.id)
    assert (user.content, user.status) == ("Tell me everything.", "complete")
    assert (reply.content, reply.status) == ("".join(pieces), "complete")
    assert history._connection.execute("SELECT count(*) FROM message_chunks").fetchone()[0] == 0, "joined into the reply at its end"


def test_the_question_and_its_reply_row_are_one_transaction(pocket_home: Path) -> None:
    history = ConversationStore(database_path())
    conversation = history.create()
    statements = count_statements(history)
    history.begin_reply(conversation.id, "Hello?")
    history._connection.set_trace_callback(None)
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
    assert sum(s.startswith("INSERT INTO messages") for s in statements) == 2
    assert [(m.role, m.status) for m in history.messages(conversation.id)] == [("user", "complete"), ("assistant", "streaming")]


# A pocketlm of its own: starts a reply, streams one batch, says "ready", and waits to be killed.
_WRITER = """
import sys, time
from pathlib import Path
from pocketlm.app.history import ConversationStore
history = ConversationStore(Path(sys.argv[1]))
conversation = history.create()
writer = history.begin_reply(conversation.id, "Are you there?")
writer.write("Yes, I am here and")
writer.flush()
writer.write(" this part is still in memory")
print("ready", flush=True)
time.sleep(600)
"""


def test_a_reply_whose_writer_is_alive_stays_streaming_and_becomes_interrupted_once_it_is_killed(pocket_home: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(database_path())], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout and writer.stdout.readline() == "ready\n"
        another = ConversationStore(database_path())  # a second pocketlm opening the same database meanwhile
        ((_, reply),) = [another.messages(c.id) for c in another.list()]
        assert (reply.status, reply.content) == ("streaming", "Yes, I am here and")
        another.close()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()

    history = ConversationStore(database_path())
    (conversation,) = history.list()
    user, reply = history.messages(conversation.id)
    assert (user.content, reply.status, reply.content) == ("Are you there?", "interrupted", "Yes, I am here and")
    assert history.chat_messages(conversation.id) == [ChatMessage("user", "Are you there?"), ChatMessage("assistant", "Yes, I am here and")]


def test_an_interrupted_reply_counts_like_a_stopped_one(pocket_home: Path) -> None:
    history = ConversationStore(database_path())
    conversation = history.create()
    history.add_message(conversation.id, "user", "first")
    history.add_message(conversation.id, "assistant", "", status="interrupted")
    history.add_message(conversation.id, "user", "second")
    history.add_message(conversation.id, "assistant", "half an answer", status="interrupted")
    assert history.chat_messages(conversation.id) == [ChatMessage("user", "second"), ChatMessage("assistant", "half an answer")]


# The tables exactly as the first release created them, before migrations.
_FIRST_RELEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT '', model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '', sampling TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'complete', model TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER, generated_tokens INTEGER, tokens_per_second REAL, stop_reason TEXT, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


def test_a_first_release_database_migrates_without_losing_a_message(pocket_home: Path) -> None:
    database_path().parent.mkdir(parents=True, exist_ok=True)
    old = sqlite3.connect(database_path())
    old.executescript(_FIRST_RELEASE_SCHEMA)
    old.execute("INSERT INTO conversations VALUES (1, 'Bread', 'SmolLM2', 'Be brief.', '{\"temperature\": 0.2}', 1.0, 2.0)")
    old.executemany(
        "INSERT INTO messages (conversation_id, role, content, status, tokens_per_second, created_at) VALUES (1, ?, ?, ?, ?, 1.5)",
        [("user", "How is bread made?", "complete", None), ("assistant", "Flour, water, salt.", "complete", 42.0),
         ("user", "And then?", "complete", None), ("assistant", "You knead it and", "streaming", None)],
    )  # fmt: skip
    old.commit()
    old.close()

    history = ConversationStore(database_path())
    (conversation,) = history.list()
    assert (conversation.title, conversation.system_prompt, conversation.sampling.temperature) == ("Bread", "Be brief.", 0.2)
    messages = history.messages(1)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "How is bread made?"), ("assistant", "Flour, water, salt."), ("user", "And then?"), ("assistant", "You knead it and"),
    ]  # fmt: skip
    assert messages[1].tokens_per_second == 42.0
    # Left streaming by a pocketlm that recorded no writer: nobody will finish it.
    assert [m.status for m in messages] == ["complete", "complete", "complete", "interrupted"]
    versions = dict(history._connection.execute("SELECT component, version FROM schema_versions").fetchall())
    assert versions["conversations"] == 3  # 3: the adapters each reply was made with
    history.close()
    assert ConversationStore(database_path()).messages(1) == messages, "opening again changes nothing"
