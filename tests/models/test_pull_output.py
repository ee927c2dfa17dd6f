"""`pocketlm pull … --output PATH`: the model ends up at PATH, registered there, and exists once on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.models.errors import PocketError
from pocketlm.models.hub import repo_cache_dir
from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull
from pocketlm.models.removal import remove_model
from pocketlm.models.store import ModelStore
from tests.hub.repos import GGUF_REPO, STARTER_FILE, TINY_CHECKPOINT
from tests.hub.server import LoopbackHub


def test_a_gguf_pulled_with_output_lives_at_that_path_and_not_in_the_cache(loopback_hub: LoopbackHub, model_store: ModelStore,
                                                                           tmp_path: Path) -> None:  # fmt: skip
    target = tmp_path / "mine" / "smol.gguf"
    model = run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q4_1")), model_store, output=target)
    assert model.path == target and target.is_file() and not target.is_symlink()
    assert model.files == (target,) and model.owned and model.quantization == "Q4_1"
    assert not list(repo_cache_dir(GGUF_REPO).glob(f"snapshots/*/{STARTER_FILE}")), "the cache keeps no second copy"
    assert not list(target.parent.glob(".*partial"))
    remove_model(model_store, model)
    assert not target.exists()


def test_a_gguf_pulled_into_an_existing_folder_keeps_its_file_name(loopback_hub: LoopbackHub, model_store: ModelStore, tmp_path: Path) -> None:
    model = run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q4_1")), model_store, output=tmp_path)
    assert model.path == tmp_path / STARTER_FILE


def test_a_checkpoint_pulled_with_output_is_a_folder_there(loopback_hub: LoopbackHub, model_store: ModelStore, tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    model = run_pull(plan_pull(parse_pull_spec(TINY_CHECKPOINT)), model_store, output=target)
    assert model.path == target and model.format == "safetensors"
    assert (target / "config.json").is_file() and any(target.glob("*.safetensors"))
    assert all(f.parent == target for f in model.files)


def test_pulling_onto_an_existing_file_is_refused_and_leaves_it_alone(loopback_hub: LoopbackHub, model_store: ModelStore, tmp_path: Path) -> None:
    target = tmp_path / "taken.gguf"
    target.write_bytes(b"the user's own file")
    with pytest.raises(PocketError, match="already exists"):
        run_pull(plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q4_1")), model_store, output=target)
    assert target.read_bytes() == b"the user's own file"
    assert model_store.list() == []


def test_a_checkpoint_folder_pull_created_is_removed_whole_with_its_extras(loopback_hub: LoopbackHub, model_store: ModelStore, tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    model = run_pull(plan_pull(parse_pull_spec(TINY_CHECKPOINT)), model_store, output=target)
    assert model_store.get(model.name).written_folder  # type: ignore[union-attr]
    (target / "notes-from-a-finetune.txt").write_text("an extra file the format does not list")
    removal = remove_model(model_store, model)
    assert removal.deleted == [target] and not target.exists()


def test_a_checkpoint_pulled_into_an_existing_folder_leaves_the_folder_and_what_else_it_holds(loopback_hub: LoopbackHub, model_store: ModelStore,
                                                                                                tmp_path: Path) -> None:  # fmt: skip
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("the user's own file")
    model = run_pull(plan_pull(parse_pull_spec(TINY_CHECKPOINT)), model_store, output=target)
    assert not model_store.get(model.name).written_folder  # type: ignore[union-attr]
    remove_model(model_store, model)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_a_failed_placement_removes_the_folder_it_created_and_no_mark_stays(pocket_home: Path, tmp_path: Path) -> None:
    from pocketlm.models.locations import models_dir
    from pocketlm.models.pull_placement import place_files

    present = tmp_path / "cache" / "config.json"
    present.parent.mkdir()
    present.write_text("{}")
    target = tmp_path / "new" / "tiny"
    with pytest.raises(PocketError, match="Cannot write the pulled files"):
        place_files([present, tmp_path / "cache" / "vanished.safetensors"], target, target, single_file=False)
    assert not target.exists()
    assert not models_dir().exists() or list(models_dir().iterdir()) == []
