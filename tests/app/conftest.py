"""Fixtures the app tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketlm.backends.base import ChatModel
from pocketlm.models.store import ModelStore
from tests.backends.openai_peer import openai_peer

# The store name the tiny checkpoint is registered under (the Convert and notification tests choose it by name).
TINY_SOURCE = "owner/tiny"


@pytest.fixture
def tiny_store(model_store: ModelStore, tiny_llama: Path) -> ModelStore:
    """A store holding the tiny random llama checkpoint as an import named TINY_SOURCE."""
    model_store.register(tiny_llama, source=f"import:{tiny_llama}", name=TINY_SOURCE)
    return model_store


@pytest.fixture
def peer_url(tiny_engine: ChatModel) -> Iterator[str]:
    """A real OpenAI-compatible server on loopback serving `tiny` (tests/backends/openai_peer.py), without a key."""
    with openai_peer(tiny_engine, "tiny") as (url, _):
        yield url
