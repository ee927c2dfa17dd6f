from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketlm.backends.base import ChatModel, LoadOptions
from pocketlm.backends.llamacpp import LlamaCppBackend
from pocketlm.models.starter import STARTER
from pocketlm.models.store import ModelStore
from tests.fixtures import CACHE_DIR, starter_gguf_path, template_free_copy


@pytest.fixture(scope="session")
def starter_gguf() -> Path:
    return starter_gguf_path()


@pytest.fixture(scope="session")
def template_free_gguf(starter_gguf: Path) -> Path:
    return template_free_copy(starter_gguf, CACHE_DIR / "models" / "SmolLM2-135M-no-template.gguf")


@pytest.fixture(scope="session")
def starter_model(starter_gguf: Path) -> Iterator[ChatModel]:
    """The real starter model on llama.cpp, loaded once for the session (2048 tokens of context)."""
    model = LlamaCppBackend().load(starter_gguf, LoadOptions(context_length=2048))
    yield model
    model.close()


@pytest.fixture
def pocket_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pocketlm data directory for this test (POCKETLM_HOME)."""
    home = tmp_path / "pocketlm-home"
    monkeypatch.setenv("POCKETLM_HOME", str(home))
    return home


@pytest.fixture
def store_with_starter(pocket_home: Path, starter_gguf: Path) -> Iterator[ModelStore]:
    """A store in `pocket_home` with the cached starter model registered under its usual name."""
    from pocketlm.models.locations import database_path

    store = ModelStore(database_path())
    # Not owned: `rm` in a test must never delete the session cache's copy.
    store.register(starter_gguf, source=STARTER.source, name=STARTER.name)
    yield store
    store.close()
