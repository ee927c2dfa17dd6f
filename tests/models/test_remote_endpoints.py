"""The remote endpoints table and how a typed name reaches a remote model (models/model_reference.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.models.errors import PocketError
from pocketlm.models.model_reference import find_model, is_registered
from pocketlm.models.remote_endpoints import RemoteEndpoint, RemoteEndpoints, normalised_base_url, parse_remote_reference, remote_reference
from pocketlm.models.store import ModelStore
from tests.backends.tiny_gguf import tiny_llama_gguf_path


def test_endpoints_are_kept_replaced_by_name_and_removed(model_store: ModelStore) -> None:
    endpoints = RemoteEndpoints(model_store.database)
    endpoints.add(RemoteEndpoint("gpu", "http://gpu-box:8000/"))
    endpoints.add(RemoteEndpoint("gpu", "https://gpu-box/v1", api_key_env="GPU_KEY"))
    assert [(e.name, e.base_url, e.api_key_env) for e in RemoteEndpoints(model_store.database).list()] == [("gpu", "https://gpu-box/v1", "GPU_KEY")]
    endpoints.remove("gpu")
    assert endpoints.list() == []
    with pytest.raises(PocketError, match="No remote endpoint named 'gpu'"):
        endpoints.remove("gpu")


def test_the_server_root_gets_v1_and_other_addresses_are_refused() -> None:
    assert normalised_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalised_base_url("http://host/api/v2/") == "http://host/api/v2"
    for bad in ("gpu-box:8000", "file:///etc/passwd", ""):
        with pytest.raises(PocketError, match="is not an http:// or https:// address"):
            normalised_base_url(bad)


def test_a_key_comes_from_the_named_variable_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_KEY", "k-1")
    monkeypatch.setenv("OPENAI_API_KEY", "not-this-servers")
    assert RemoteEndpoint("a", "http://h/v1", "SOME_KEY").api_key() == "k-1"
    assert RemoteEndpoint("a", "http://h/v1").api_key() is None  # keyring is not installed here


def test_a_model_id_with_slashes_survives_the_reference() -> None:
    assert parse_remote_reference(remote_reference("gpu", "meta-llama/Llama-3.1-8B")) == ("gpu", "meta-llama/Llama-3.1-8B")
    assert parse_remote_reference(remote_reference("gpu", None)) == ("gpu", None)


def test_a_stored_name_wins_then_an_endpoint_then_a_stored_prefix(model_store: ModelStore) -> None:
    model_store.register(tiny_llama_gguf_path(), source="import:tiny", name="gpu-tiny")
    endpoints = RemoteEndpoints(model_store.database)
    endpoints.add(RemoteEndpoint("gpu", "http://gpu-box:8000/v1"))
    remote = find_model(model_store, "gpu")  # not the prefix of gpu-tiny: the endpoint named exactly that
    assert (remote.format, remote.path, remote.files, is_registered(remote)) == ("remote", Path("gpu"), (), False)
    assert find_model(model_store, "gpu/Qwen/Qwen3-8B").path == Path("gpu/Qwen/Qwen3-8B")
    assert find_model(model_store, "gpu-tiny").format == "gguf"
    endpoints.add(RemoteEndpoint("gpu-tiny", "http://other/v1"))
    assert find_model(model_store, "gpu-tiny").format == "gguf"  # the stored model's exact name wins over an endpoint's
    assert find_model(model_store, "gpu-t").format == "gguf"  # a prefix still finds the stored model
