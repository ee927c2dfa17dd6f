"""From what a user typed (a store name, a prefix or a path) to a loaded ChatModel."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pocketlm.app.history import ConversationStore
from pocketlm.backends.base import ChatModel, LoadOptions
from pocketlm.backends.registry import backend_for
from pocketlm.models.model_reference import find_model
from pocketlm.models.store import ModelStore


@dataclass(frozen=True)
class ModelChoice:
    name: str
    path: Path
    format: str


def choose_model(store: ModelStore, query: str) -> ModelChoice:
    """A store name, a unique prefix, or a model file or folder path (models/model_reference.py: a path that exists
    wins over a store name, so `pocketlm chat ./x.gguf` always means that file)."""
    model = find_model(store, query)
    return ModelChoice(model.name, model.path, model.format)


def load_model(choice: ModelChoice, options: LoadOptions, backend: str | None = None) -> ChatModel:
    model = backend_for(choice.format, backend).load(choice.path, options)
    # Users know a model by its store name; the backend only saw a file.
    model.description = replace(model.description, name=choice.name)
    return model


def default_model_name(store: ModelStore, history: ConversationStore) -> str | None:
    """The model of the latest conversation, else the first stored one; None when the store is empty."""
    names = {model.name for model in store.list()}
    for conversation in history.list():
        if conversation.model in names:
            return conversation.model
    return min(names) if names else None
