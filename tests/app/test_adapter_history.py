"""The chat history records, for each reply, the LoRA adapters it was made with and their scales."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from pocketlm.app.adapter_loading import adapter_spec_for
from pocketlm.app.chat_session import reply
from pocketlm.app.history import _MIGRATIONS, ConversationStore, UsedAdapter, adapters_label
from pocketlm.app.model_loading import ModelChoice, load_model
from pocketlm.backends.base import AdapterSpec, LoadOptions, SamplingParams
from pocketlm.models.database import connect, migrate
from pocketlm.models.store import ModelStore

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def test_begin_reply_records_each_adapter_with_its_scale_and_the_users_message_none(tmp_path: Path) -> None:
    history = ConversationStore(tmp_path / "history.db")
    conversation = history.create(model="tiny")
    adapters = (AdapterSpec(tmp_path / "plain", 0.5, "plain"), AdapterSpec(tmp_path / "style.gguf"))
    history.begin_reply(conversation.id, "Hello", model="tiny", adapters=adapters).finish("complete")
    user, answer = history.messages(conversation.id)
    assert user.adapters == ()
    # A spec without a store name is known by its file name, as AdapterSpec.label says.
    assert answer.adapters == (UsedAdapter("plain", 0.5), UsedAdapter("style", 1.0))
    assert adapters_label(answer.adapters) == "plain ×0.5 + style"


def test_a_database_from_before_adapters_gains_the_column_and_its_replies_read_as_made_without(tmp_path: Path) -> None:
    database = tmp_path / "old.db"
    connection = connect(database)
    migrate(connection, "conversations", _MIGRATIONS[:2])  # the schema before this release
    connection.execute("INSERT INTO conversations (id, model, created_at, updated_at) VALUES (1, 'tiny', 0, 0)")
    connection.execute("INSERT INTO messages (conversation_id, role, content, status, created_at) VALUES (1, 'assistant', 'old reply', 'complete', ?)", (time.time(),))
    connection.close()
    history = ConversationStore(database)
    (old,) = history.messages(1)
    assert old.content == "old reply" and old.adapters == ()


def test_an_unreadable_adapters_entry_reads_as_none_rather_than_failing(tmp_path: Path) -> None:
    history = ConversationStore(tmp_path / "history.db")
    conversation = history.create()
    history.begin_reply(conversation.id, "Hi").finish("complete")
    with sqlite3.connect(tmp_path / "history.db") as raw:  # as a later pocketlm might write it
        raw.execute("UPDATE messages SET adapters = '{\"v2\": true}' WHERE role = 'assistant'")
    assert history.messages(conversation.id)[-1].adapters == ()


def test_each_reply_records_the_adapters_active_when_it_was_made(model_store: ModelStore, tiny_llama_f32_gguf: Path,
                                                                  tiny_adapters: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    model_store.register(tiny_adapters["plain"], source="import:test", name="plain")
    base = ModelChoice("tiny", tiny_llama_f32_gguf, "gguf")
    spec = adapter_spec_for(model_store, "plain", 0.5, "llama.cpp", base)
    model = load_model(base, LoadOptions(context_length=256), "llama.cpp", [spec])
    history = ConversationStore(tmp_path / "history.db")
    try:
        conversation = history.create(model="tiny")
        list(reply(history, model, conversation.id, "Hello", GREEDY))
        model.set_adapters([])  # detached mid-conversation: the next reply is the base model's
        list(reply(history, model, conversation.id, "Again", GREEDY))
    finally:
        model.close()
    replies = [m.adapters for m in history.messages(conversation.id) if m.role == "assistant"]
    assert replies == [(UsedAdapter("plain", 0.5),), ()]


def test_an_adapter_and_its_scale_read_the_same_wherever_they_are_shown(tmp_path: Path) -> None:
    """The status line, the REPL and the history all label through used_adapters + adapters_label."""
    from pocketlm.app.history import used_adapters

    specs = (AdapterSpec(tmp_path / "style", 1.0, "style"), AdapterSpec(tmp_path / "plain.gguf", 0.5), AdapterSpec(tmp_path / "x", 3.0, "x"))
    assert adapters_label(used_adapters(specs)) == "style + plain ×0.5 + x ×3"
    history = ConversationStore(tmp_path / "history.db")
    conversation = history.create(model="tiny")
    history.begin_reply(conversation.id, "Hello", model="tiny", adapters=specs).finish("complete")
    assert adapters_label(history.messages(conversation.id)[-1].adapters) == "style + plain ×0.5 + x ×3"
