"""What a user typed to name a model (a store name, a unique prefix, a file or a folder path) made into the model.

The one resolver behind `chat`, `run`, `info`, `rm`, `convert` and `quantize`, so a path names the same model
everywhere: a path that exists wins over a store name (`pocketlm chat ./x.gguf` always means that file), a path
in the store is that stored entry (with its name, lineage and ownership), and any other path is read as it is.
A name that is not a stored model's but starts with a remote endpoint's (`NAME` or `NAME/MODEL`, see
`pocketlm remote add`) is that endpoint's model: a LocalModel of format "remote" with no files.
"""

from __future__ import annotations

import os
from pathlib import Path

from pocketlm.models.errors import ModelNotFound
from pocketlm.models.formats import inspect_model
from pocketlm.models.remote_endpoints import REMOTE_FORMAT, RemoteEndpoints, parse_remote_reference, remote_reference
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
    # A stored model's exact name wins, then an endpoint's, then a stored name's prefix ("gpu" must not mean "gpu-7b").
    if (stored := store.get(query)) is not None:
        return stored
    if (remote := remote_model(store, query)) is not None:
        return remote
    return store.resolve(query)


def remote_model(store: ModelStore, query: str) -> LocalModel | None:
    """The remote model `query` (`NAME` or `NAME/MODEL`) names, or None when NAME is no configured endpoint. Never
    reaches the network: which model a bare NAME means is the backend's question when it loads."""
    endpoint_name, model = parse_remote_reference(query)
    endpoints = RemoteEndpoints(store.database)
    try:
        endpoint = endpoints.get(endpoint_name)
    finally:
        endpoints.close()
    if endpoint is None:
        return None
    return LocalModel(name=query, path=remote_reference(endpoint.name, model), format=REMOTE_FORMAT, architecture="",
                      parameter_count=0, quantization="", context_length=0, size_bytes=0, source=f"remote:{endpoint.base_url}")  # fmt: skip


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
    """Whether `model` is a row of the store (a remote endpoint's model is the endpoints table's, with no files)."""
    return model.source != UNREGISTERED_SOURCE and model.format != REMOTE_FORMAT


def looks_like_path(query: str) -> bool:
    """What can only be meant as a path: a .gguf name, or one starting at the root, the home or the current folder."""
    return query.lower().endswith(".gguf") or query.startswith(("/", "~", "./", "../", ".\\", "..\\")) or (os.sep != "/" and os.sep in query)
