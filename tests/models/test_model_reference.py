"""One resolver names a model everywhere: a store name, a unique prefix, a file or a folder path, a link to one."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from pocketlm.models.errors import ModelFileError, ModelNotFound
from pocketlm.models.model_reference import find_model, is_registered
from pocketlm.models.store import ModelStore
from tests.backends.tiny_gguf import write_tiny_llama_gguf


def small_checkpoint(folder: Path) -> Path:
    """A Hugging Face folder (config, one 2-value tensor) that format detection accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0))
    return folder


def tiny_gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tiny_llama_gguf(path)


@pytest.fixture
def stored(model_store: ModelStore, tmp_path: Path) -> ModelStore:
    model_store.register(tiny_gguf(tmp_path / "files" / "tiny.gguf"), source="import", name="owner/tiny-llama:F16")
    model_store.register(small_checkpoint(tmp_path / "files" / "checkpoint"), source="import", name="owner/small-checkpoint")
    return model_store


def test_a_store_name_and_a_unique_prefix_name_the_stored_model(stored: ModelStore) -> None:
    assert find_model(stored, "owner/tiny-llama:F16").name == "owner/tiny-llama:F16"
    assert find_model(stored, "small").name == "owner/small-checkpoint"


def test_a_registered_file_or_folder_path_names_its_store_entry(stored: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_model(stored, str(tmp_path / "files" / "tiny.gguf")).name == "owner/tiny-llama:F16"
    assert find_model(stored, str(tmp_path / "files" / "checkpoint")).name == "owner/small-checkpoint"
    monkeypatch.chdir(tmp_path / "files")
    relative = find_model(stored, "./checkpoint/")
    assert relative.name == "owner/small-checkpoint" and is_registered(relative) and relative.source == "import"


def test_a_link_to_a_stored_model_and_the_file_behind_a_stored_link_name_it(model_store: ModelStore, tmp_path: Path) -> None:
    # The Hub cache stores links into blobs: a model is registered by its link, and may be named by either.
    blob = tiny_gguf(tmp_path / "blobs" / "abc123")
    link = tmp_path / "snapshots" / "model.gguf"
    link.parent.mkdir()
    link.symlink_to(blob)
    model_store.register(link, source="hf:owner/model@abc", name="owner/model:F16")
    assert find_model(model_store, str(link)).name == "owner/model:F16"
    assert find_model(model_store, str(blob)).name == "owner/model:F16"


def test_a_home_relative_path_is_expanded(stored: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "files"))
    assert find_model(stored, "~/tiny.gguf").name == "owner/tiny-llama:F16"


def test_an_unregistered_path_is_read_from_its_files_and_not_registered(stored: ModelStore, tmp_path: Path) -> None:
    gguf = find_model(stored, str(tiny_gguf(tmp_path / "elsewhere" / "other.gguf")))
    assert (gguf.name, gguf.format, gguf.path) == ("other", "gguf", tmp_path / "elsewhere" / "other.gguf")
    assert not is_registered(gguf)
    folder = find_model(stored, str(small_checkpoint(tmp_path / "elsewhere" / "other-checkpoint")))
    assert (folder.name, folder.format, folder.path) == ("other-checkpoint", "safetensors", tmp_path / "elsewhere" / "other-checkpoint")
    assert not is_registered(folder)
    assert {m.name for m in stored.list()} == {"owner/tiny-llama:F16", "owner/small-checkpoint"}


def test_an_existing_path_wins_over_a_store_name(stored: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    small_checkpoint(tmp_path / "small")  # "small" is also a prefix of owner/small-checkpoint
    found = find_model(stored, "small")
    assert found.path == tmp_path / "small" and not is_registered(found)


def test_a_missing_path_and_an_unknown_name_are_refused_with_a_sentence(stored: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="gone.gguf does not exist"):
        find_model(stored, str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelFileError, match="does not exist"):
        find_model(stored, "./no-such-folder")
    with pytest.raises(ModelNotFound, match="No model named 'llama-70b' in the store"):
        find_model(stored, "llama-70b")
    with pytest.raises(ModelNotFound, match="matches several models"):
        find_model(stored, "owner/")


def test_a_folder_path_with_a_trailing_separator_or_dots_is_the_same_folder(stored: ModelStore, tmp_path: Path) -> None:
    roundabout = str(tmp_path / "files" / "checkpoint" / ".." / "checkpoint") + os.sep
    assert find_model(stored, roundabout).name == "owner/small-checkpoint"
