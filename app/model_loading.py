"""From what a user typed (a store name, a prefix or a path) to a loaded ChatModel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pocketlm.app.history import ConversationStore
from pocketlm.backends.base import AdapterSpec, ChatModel, LoadOptions, with_adapters
from pocketlm.backends.registry import backend_for
from pocketlm.models.model_reference import find_model
from pocketlm.models.progress import ProgressCallback, ignore_progress
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


def load_model(choice: ModelChoice, options: LoadOptions, backend: str | None = None, adapters: Sequence[AdapterSpec] = ()) -> ChatModel:
    """The model loaded by `backend` (default: the usual one for its format), then `adapters` made its active set
    (AdapterSpecs in that backend's format: see adapter_specs). A set that does not fit closes the model again."""
    model = backend_for(choice.format, backend).load(choice.path, options)
    # Users know a model by its store name; the backend only saw a file.
    model.description = replace(model.description, name=choice.name)
    return with_adapters(model, adapters)


def backend_name(choice: ModelChoice, backend: str | None = None) -> str:
    """The name of the backend `load_model` will open `choice` with."""
    return backend_for(choice.format, backend).name


def adapter_specs(store: ModelStore, choice: ModelChoice, requests: Sequence[tuple[str, float]], backend: str | None = None,
                  on_progress: ProgressCallback = ignore_progress) -> tuple[AdapterSpec, ...]:  # fmt: skip
    """Each (adapter, scale) the user asked for, checked against `choice` and in the format of the backend that will
    load it (converted once, then reused from the store), before the model itself loads: a misfit costs no load."""
    from pocketlm.app.adapter_loading import adapter_spec_for

    if not requests:
        return ()
    name = backend_name(choice, backend)
    specs = [adapter_spec_for(store, query, scale, name, choice, on_progress) for query, scale in requests]
    return tuple(_distinct(specs))


def _distinct(specs: list[AdapterSpec]) -> list[AdapterSpec]:
    """One entry per adapter: the same one named twice (`--adapter a --adapter a:0.5`) keeps the last scale."""
    by_name = {spec.name or str(spec.path): spec for spec in specs}
    return list(by_name.values())


def default_model_name(store: ModelStore, history: ConversationStore) -> str | None:
    """The model of the latest conversation, else the first stored one; None when the store is empty."""
    names = {model.name for model in store.list()}
    for conversation in history.list():
        if conversation.model in names:
            return conversation.model
    return min(names) if names else None
