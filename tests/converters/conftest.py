"""Fixtures the converter tests share (tiny_llama, used by the app's tests too, is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.test_cli import pocketlm
from tests.backends.tiny_gguf import write_tiny_llama_gguf


@pytest.fixture
def tiny_f16(tmp_path: Path) -> Path:
    """A random tiny Llama as an f16 GGUF, written in milliseconds."""
    (tmp_path / "input").mkdir()
    return write_tiny_llama_gguf(tmp_path / "input" / "tiny.gguf")


@pytest.fixture
def imported_f16(converted_f16: Path, pocket_home: Path) -> str:
    """The real starter model's f16 GGUF, imported into the store as `smol-f16`."""
    result = pocketlm("import", str(converted_f16), "--name", "smol-f16", home=pocket_home)
    assert result.returncode == 0, result.stderr
    return "smol-f16"
