"""What a user typed to name a model (a store name, a unique prefix, a file or a folder path) made into the model.

The one resolver behind `chat`, `run`, `info`, `rm`, `convert` and `quantize`, so a path names the same model
everywhere: a path that exists wins over a store name (`pocketlm chat ./x.gguf` always means that file), a path
in the store is that stored entry (with its name, lineage and ownership), and any other path is read as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from pocketlm.models.errors import ModelNotFound
from pocketlm.models.formats import inspect_model
from pocketlm.models.store import LocalModel, ModelStore, model_from_facts

UNREGISTERED_SOURCE = "path"  # the `source` of a model read from a path the store does not know


def find_model(store: ModelStore, query: str) -> LocalModel:
    """The model `query` names; raises ModelNotFound (a name) or ModelFileError (a path) with a sentence."""
    candidate = Path(query).expanduser()
    if candidate.exists() or candidate.is_symlink():
        return model_at(store, candidate)
    if looks_like_path(query):
        try:
            return store.resolve(query)  # a store name may look like a path ("owner/model.gguf")
        except ModelNotFound:
            return model_at(store, candidate)  # inspect_model says the path does not exist
    return store.resolve(query)


def model_at(store: ModelStore, path: Path) -> LocalModel:
    """The stored entry for `path`, or an unregistered model read from its files."""
    registered = store.models_at(path)
    if registered:
        return registered[0]
    path = path.absolute()
    facts = inspect_model(path)
    name = path.stem if path.is_file() else path.name
    return model_from_facts(name, facts, UNREGISTERED_SOURCE)


def is_registered(model: LocalModel) -> bool:
    return model.source != UNREGISTERED_SOURCE


def looks_like_path(query: str) -> bool:
    """What can only be meant as a path: a .gguf name, or one starting at the root, the home or the current folder."""
    return query.lower().endswith(".gguf") or query.startswith(("/", "~", "./", "../", ".\\", "..\\")) or (os.sep != "/" and os.sep in query)
