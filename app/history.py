"""Conversations in SQLite. The user's message and the reply's row are committed together before generation
starts, and the reply's text goes in batches as it streams (ReplyWriter), so a killed process loses only the last
batch window; the next store to open marks such a reply "interrupted"."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from pocketlm.backends.base import AdapterSpec, ChatMessage, GenerationStats, Role, SamplingParams
from pocketlm.models.database import connect, migrate

# interrupted: the process writing it died mid-reply (kill -9, power cut); it holds the text up to its last batch.
MessageStatus = Literal["complete", "streaming", "cancelled", "failed", "interrupted"]

# A streaming reply reaches the database at most this often (and at its end): a killed process loses at most this
# window, and a fast model costs a write per batch instead of one per token.
BATCH_SECONDS = 0.25

_MIGRATIONS = [
    # 1: the first release's tables. Databases from before migrations have them already (IF NOT EXISTS).
    """CREATE TABLE IF NOT EXISTS conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '',
        system_prompt TEXT NOT NULL DEFAULT '',
        sampling TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete',
        model TEXT NOT NULL DEFAULT '',
        prompt_tokens INTEGER,
        generated_tokens INTEGER,
        tokens_per_second REAL,
        stop_reason TEXT,
        created_at REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id)""",
    # 2: the process streaming a reply (pid and start time, as pids are reused), so a reply whose writer died is told
    # from one another live pocketlm is writing; and a streaming reply's batches as rows of their own, joined into
    # the message when it ends: appending to one growing row rewrites it whole, quadratic in the reply's length.
    """ALTER TABLE messages ADD COLUMN writer_pid INTEGER;
    ALTER TABLE messages ADD COLUMN writer_started REAL;
    CREATE TABLE message_chunks (
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        text TEXT NOT NULL,
        PRIMARY KEY (message_id, seq)) WITHOUT ROWID""",
    # 3: the LoRA adapters a reply was made with, and at what scales: a JSON list of {"name", "scale"}, empty for none.
    """ALTER TABLE messages ADD COLUMN adapters TEXT NOT NULL DEFAULT ''""",
]
_TITLE_LENGTH = 48


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    model: str
    system_prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    updated_at: float = 0.0


@dataclass(frozen=True)
class UsedAdapter:
    """An adapter a reply was made with: its store name and the scale it was applied at."""

    name: str
    scale: float = 1.0

    @property
    def label(self) -> str:
        """"my-lora" at scale 1, "my-lora ×0.5" otherwise."""
        return self.name if self.scale == 1 else f"{self.name} ×{self.scale:g}"


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: Role
    content: str
    status: MessageStatus
    tokens_per_second: float | None = None
    adapters: tuple[UsedAdapter, ...] = ()  # a reply's adapters; () for a message the user wrote, or a reply made without


def used_adapters(adapters: Sequence[AdapterSpec | UsedAdapter]) -> tuple[UsedAdapter, ...]:
    """A model's adapters (description.adapters) as a reply records them: each one's name and scale."""
    return tuple(UsedAdapter(a.label, a.scale) if isinstance(a, AdapterSpec) else a for a in adapters)


def adapters_label(adapters: Sequence[UsedAdapter]) -> str:
    """"my-lora ×0.5 + style": how the CLI, the status line and the Chat screen show adapters; "" for none."""
    return " + ".join(adapter.label for adapter in adapters)


def _adapters_to_json(adapters: Sequence[AdapterSpec | UsedAdapter]) -> str:
    if not adapters:
        return ""
    return json.dumps([{"name": adapter.name, "scale": adapter.scale} for adapter in used_adapters(adapters)])


def _adapters_from_json(text: str) -> tuple[UsedAdapter, ...]:
    """A reply's adapters as stored; what a later pocketlm could write and this one cannot read is left out, not fatal."""
    try:
        entries = json.loads(text) if text else []
    except ValueError:
        return ()
    used = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("scale"), (int, float)):
            used.append(UsedAdapter(entry["name"], float(entry["scale"])))
    return tuple(used)


def _sampling_from_json(text: str) -> SamplingParams:
    values = json.loads(text or "{}")
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    known = SamplingParams.__dataclass_fields__
    return SamplingParams(**{key: value for key, value in values.items() if key in known})


def _process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None when it is gone or a zombie."""
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # alive, another user's: whether it is the writer cannot be told; NaN never counts as gone
        return float("nan")


def _writer_is_gone(pid: int | None, started: float | None) -> bool:
    if pid is None or started is None:  # written by a pocketlm from before writers were recorded
        return True
    now_started = _process_started(pid)
    # A pid reused by a later process has a later start time; 1 s covers the start time's rounding.
    return now_started is None or abs(now_started - started) > 1.0


class ConversationStore:
    def __init__(self, database: Path) -> None:
        self._connection = connect(database)
        self._lock = threading.Lock()
        with self._lock:
            migrate(self._connection, "conversations", _MIGRATIONS)
        self._mark_interrupted()

    def _execute(self, sql: str, parameters: tuple | dict = ()) -> list:  # type: ignore[type-arg]
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    @cached_property
    def _writer(self) -> tuple[int, float | None]:
        """This process as the writer of the replies it streams (asked of psutil only once a reply is written)."""
        return os.getpid(), _process_started(os.getpid())

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._connection.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back by itself (a full disk, an I/O error): a second ROLLBACK would raise and
                # hide the real error, and a failed COMMIT must not leave the transaction open for every later one.
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
                raise

    def _mark_interrupted(self) -> None:
        """Replies left "streaming" by a process that is gone (killed mid-reply) become "interrupted"."""
        streaming = self._execute("SELECT id, writer_pid, writer_started FROM messages WHERE status = 'streaming'")
        for row in streaming:
            if _writer_is_gone(row["writer_pid"], row["writer_started"]):
                self.finish_message(row["id"], "interrupted")

    def create(self, model: str = "", system_prompt: str = "", sampling: SamplingParams | None = None) -> Conversation:
        now = time.time()
        sampling = sampling or SamplingParams()
        with self._lock:
            cursor = self._connection.execute(
                "INSERT INTO conversations (model, system_prompt, sampling, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (model, system_prompt, json.dumps(asdict(sampling)), now, now),
            )
        return Conversation(int(cursor.lastrowid or 0), "", model, system_prompt, sampling, now)

    def get(self, conversation_id: int) -> Conversation | None:
        rows = self._execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        return self._to_conversation(rows[0]) if rows else None

    @staticmethod
    def _to_conversation(row) -> Conversation:  # type: ignore[no-untyped-def]
        return Conversation(row["id"], row["title"], row["model"], row["system_prompt"], _sampling_from_json(row["sampling"]), row["updated_at"])

    def list(self) -> list[Conversation]:
        """Newest activity first."""
        return [self._to_conversation(row) for row in self._execute("SELECT * FROM conversations ORDER BY updated_at DESC, id DESC")]

    def update(self, conversation_id: int, *, title: str | None = None, model: str | None = None,
               system_prompt: str | None = None, sampling: SamplingParams | None = None) -> None:  # fmt: skip
        changes = {"title": title, "model": model, "system_prompt": system_prompt,
                   "sampling": json.dumps(asdict(sampling)) if sampling else None}  # fmt: skip
        changes = {key: value for key, value in changes.items() if value is not None}
        if changes:
            assignments = ", ".join(f"{key} = :{key}" for key in changes)
            self._execute(f"UPDATE conversations SET {assignments} WHERE id = :id", {**changes, "id": conversation_id})

    def delete(self, conversation_id: int) -> None:
        self._execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._execute(
            "SELECT id, role, content, status, tokens_per_second, adapters FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        messages = []
        for row in rows:
            # A reply still streaming keeps its batches apart until it ends.
            content = row["content"] + self._streamed(row["id"]) if row["status"] == "streaming" else row["content"]
            messages.append(StoredMessage(row["id"], row["role"], content, row["status"], row["tokens_per_second"], _adapters_from_json(row["adapters"])))
        return messages

    def _streamed(self, message_id: int) -> str:
        """The batches of a reply still streaming, joined."""
        with self._lock:
            return self._streamed_locked(message_id)

    def _streamed_locked(self, message_id: int) -> str:
        rows = self._connection.execute("SELECT text FROM message_chunks WHERE message_id = ? ORDER BY seq", (message_id,)).fetchall()
        return "".join(row["text"] for row in rows)

    def chat_messages(self, conversation_id: int) -> list[ChatMessage]:
        """The conversation as a model sees it: the system prompt, then its turns.

        A reply that failed, or was stopped or interrupted before its first word, is left out with the message it
        answered, so the turns keep alternating (many chat templates refuse two user messages in a row).
        """
        conversation = self.get(conversation_id)
        turns = [ChatMessage("system", conversation.system_prompt)] if conversation and conversation.system_prompt else []
        for message in self.messages(conversation_id):
            if message.role == "assistant" and (message.status == "failed" or not message.content):
                if turns and turns[-1].role == "user":
                    turns.pop()
                continue
            turns.append(ChatMessage(message.role, message.content))
        return turns

    def add_message(self, conversation_id: int, role: Role, content: str, status: MessageStatus = "complete", model: str = "") -> int:
        with self._transaction():
            return self._insert_message(conversation_id, role, content, status, model)

    def _insert_message(self, conversation_id: int, role: Role, content: str, status: MessageStatus, model: str, adapters: str = "") -> int:
        now = time.time()
        writer_pid, writer_started = self._writer if status == "streaming" else (None, None)
        cursor = self._connection.execute(
            "INSERT INTO messages (conversation_id, role, content, status, model, created_at, writer_pid, writer_started, adapters)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, role, content, status, model, now, writer_pid, writer_started, adapters),
        )
        self._connection.execute(
            "UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' AND ? = 'user' THEN ? ELSE title END WHERE id = ?",
            (now, role, _title_from(content), conversation_id),
        )
        return int(cursor.lastrowid or 0)

    def begin_reply(self, conversation_id: int, user_text: str, model: str = "", adapters: Sequence[AdapterSpec | UsedAdapter] = (),
                    clock: Callable[[], float] = time.monotonic) -> ReplyWriter:  # fmt: skip
        """Store the user's message and an empty streaming reply to it, in one transaction; the writer fills the reply.
        `adapters` are the ones the reply is made with (the model's description.adapters), each at its scale."""
        with self._transaction():
            self._insert_message(conversation_id, "user", user_text, "complete", "")
            reply_id = self._insert_message(conversation_id, "assistant", "", "streaming", model, _adapters_to_json(adapters))
        return ReplyWriter(self, reply_id, clock)

    def append_to_message(self, message_id: int, text: str) -> None:
        """Add `text` to a streaming reply: one small row, whatever the reply's length so far."""
        self._execute(
            "INSERT INTO message_chunks (message_id, seq, text)"
            " VALUES (?, (SELECT coalesce(max(seq), -1) + 1 FROM message_chunks WHERE message_id = ?), ?)",
            (message_id, message_id, text),
        )

    def finish_message(self, message_id: int, status: MessageStatus, stats: GenerationStats | None = None, tail: str = "") -> None:
        """End a reply: its batches and `tail` joined into its text, with its status and stats, in one transaction."""
        with self._transaction():
            streamed = self._streamed_locked(message_id) + tail
            self._connection.execute(
                "UPDATE messages SET content = content || ?, status = ?, prompt_tokens = ?, generated_tokens = ?,"
                " tokens_per_second = ?, stop_reason = ?, writer_pid = NULL, writer_started = NULL WHERE id = ?",
                (streamed, status, stats and stats.prompt_tokens, stats and stats.generated_tokens,
                 stats and stats.tokens_per_second, stats and stats.stop_reason, message_id),
            )  # fmt: skip
            self._connection.execute("DELETE FROM message_chunks WHERE message_id = ?", (message_id,))

    def close(self) -> None:
        self._connection.close()


def _title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _TITLE_LENGTH else line[: _TITLE_LENGTH - 1].rstrip() + "…"


class ReplyWriter:
    """A reply streaming into the store: its text reaches the database at most every BATCH_SECONDS, and at the end."""

    def __init__(self, store: ConversationStore, message_id: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.message_id = message_id
        self._clock = clock
        self._pending: list[str] = []
        self._last_write = clock()

    def write(self, text: str) -> None:
        self._pending.append(text)
        if self._clock() - self._last_write >= BATCH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.store.append_to_message(self.message_id, "".join(self._pending))
            self._pending.clear()
        self._last_write = self._clock()

    def finish(self, status: MessageStatus, stats: GenerationStats | None = None) -> None:
        """Store what is pending with the reply's final status, in one transaction."""
        tail = "".join(self._pending)
        self._pending.clear()
        self.store.finish_message(self.message_id, status, stats, tail)
