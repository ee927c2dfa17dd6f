"""`rm` of a folder model: a folder pocketlm wrote goes whole, extras included; a folder it did not write never does."""

from __future__ import annotations

from pathlib import Path

from pocketlm.models.locations import models_dir
from pocketlm.models.removal import plan_removal, remove_model
from pocketlm.models.store import ModelStore
from tests.models.test_formats import gptq_checkpoint


def test_a_folder_pocketlm_wrote_is_removed_whole_with_its_unlisted_extras(model_store: ModelStore) -> None:
    folder = gptq_checkpoint(models_dir() / "tiny-GPTQ-4bit-g128")
    (folder / "quant_log.csv").write_text("layer,loss\n0,0.1\n")  # written beside the checkpoint; the format does not list it
    model = model_store.register(folder, source="convert", name="tiny:GPTQ-4bit-g128", owned=True, written_folder=True)
    assert folder / "quant_log.csv" not in model.files
    removal = plan_removal(model_store, model)
    assert removal.deleted == [folder] and removal.freed_bytes == sum(f.stat().st_size for f in folder.iterdir())
    assert "delete its folder" in removal.summary(model.name)
    remove_model(model_store, model)
    assert not folder.exists() and model_store.list() == []


def test_an_imported_folder_is_never_deleted(model_store: ModelStore, tmp_path: Path) -> None:
    folder = gptq_checkpoint(tmp_path / "mine")
    model = model_store.register(folder, source=f"import:{folder}", name="mine")
    removal = remove_model(model_store, model)
    assert removal.deleted == [] and sorted(removal.kept_not_owned) == sorted(model.files)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_a_folder_whose_files_another_model_uses_keeps_them(model_store: ModelStore) -> None:
    folder = gptq_checkpoint(models_dir() / "shared-GPTQ")
    first = model_store.register(folder, source="convert", name="first", owned=True, written_folder=True)
    model_store.register(folder, source="convert", name="second", owned=True, written_folder=True)
    removal = remove_model(model_store, first)
    assert removal.deleted == [] and folder.is_dir() and model_store.get("second") is not None
