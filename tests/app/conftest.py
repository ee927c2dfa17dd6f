"""Fixtures the app tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.models.store import ModelStore

# The store name the tiny checkpoint is registered under (the Convert and notification tests choose it by name).
TINY_SOURCE = "owner/tiny"


@pytest.fixture
def tiny_store(model_store: ModelStore, tiny_llama: Path) -> ModelStore:
    """A store holding the tiny random llama checkpoint as an import named TINY_SOURCE."""
    model_store.register(tiny_llama, source=f"import:{tiny_llama}", name=TINY_SOURCE)
    return model_store
