"""Conversations in SQLite. The user's message is committed before generation starts and the reply grows
row by row as it streams, so a killed process loses only the tokens in flight."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pocketlm.backends.base import ChatMessage, GenerationStats, Role, SamplingParams
from pocketlm.models.database import connect

MessageStatus = Literal["complete", "streaming", "cancelled", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    sampling TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
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
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""
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
class StoredMessage:
    id: int
    role: Role
    content: str
    status: MessageStatus
    tokens_per_second: float | None = None


def _sampling_from_json(text: str) -> SamplingParams:
    values = json.loads(text or "{}")
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    known = SamplingParams.__dataclass_fields__
    return SamplingParams(**{key: value for key, value in values.items() if key in known})


class ConversationStore:
    def __init__(self, database: Path) -> None:
        self._connection = connect(database)
        self._lock = threading.Lock()
        self._connection.executescript(_SCHEMA)

    def _execute(self, sql: str, parameters: tuple | dict = ()) -> list:  # type: ignore[type-arg]
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

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
            "SELECT id, role, content, status, tokens_per_second FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [StoredMessage(row["id"], row["role"], row["content"], row["status"], row["tokens_per_second"]) for row in rows]

    def chat_messages(self, conversation_id: int) -> list[ChatMessage]:
        """The conversation as a model sees it: the system prompt, then its turns.

        A reply that failed or was stopped before its first word is left out with the message it answered, so
        the turns keep alternating (many chat templates refuse two user messages in a row).
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
        now = time.time()
        with self._lock:
            cursor = self._connection.execute(
                "INSERT INTO messages (conversation_id, role, content, status, model, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, model, now),
            )
            self._connection.execute(
                "UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' AND ? = 'user' THEN ? ELSE title END WHERE id = ?",
                (now, role, _title_from(content), conversation_id),
            )
        return int(cursor.lastrowid or 0)

    def append_to_message(self, message_id: int, text: str) -> None:
        self._execute("UPDATE messages SET content = content || ? WHERE id = ?", (text, message_id))

    def finish_message(self, message_id: int, status: MessageStatus, stats: GenerationStats | None = None) -> None:
        self._execute(
            "UPDATE messages SET status = ?, prompt_tokens = ?, generated_tokens = ?, tokens_per_second = ?, stop_reason = ? WHERE id = ?",
            (status, stats and stats.prompt_tokens, stats and stats.generated_tokens,
             stats and stats.tokens_per_second, stats and stats.stop_reason, message_id),
        )  # fmt: skip

    def close(self) -> None:
        self._connection.close()


def _title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _TITLE_LENGTH else line[: _TITLE_LENGTH - 1].rstrip() + "…"
