"""`rm` killed with SIGKILL between its steps never leaves a registry entry whose files are gone: the entry goes first."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

from pocketlm.models.locations import database_path, models_dir
from pocketlm.models.store import ModelStore
from tests.app.test_cli import pocketlm
from tests.converters.test_kill_during_conversion import KILL_AT_EVENT


def small_checkpoint(folder: Path) -> Path:
    """A three-file Hugging Face folder (config, tokenizer, one 2-value tensor) that format detection accepts."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0))
    return folder


def test_kill_9_after_some_files_are_deleted_leaves_no_entry(pocket_home: Path) -> None:
    folder = small_checkpoint(models_dir() / "small")
    store = ModelStore(database_path())
    store.register(folder, source="convert", name="small", owned=True)  # pocketlm's own files, so rm deletes them
    store.close()
    # Files go in path order: config.json, model.safetensors, then tokenizer.json, where the kill comes.
    result = subprocess.run([sys.executable, "-c", KILL_AT_EVENT, "os.remove", "tokenizer.json", "", "rm", "small", "-y"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "POCKETLM_HOME": str(pocket_home)})  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (folder / "config.json").exists() and (folder / "tokenizer.json").exists()  # killed halfway through the files
    listed = pocketlm("ls", home=pocket_home)
    assert listed.returncode == 0, listed.stderr
    store = ModelStore(database_path())
    try:
        assert store.get("small") is None
    finally:
        store.close()


def test_an_entry_whose_files_are_gone_is_removed_without_error(pocket_home: Path) -> None:
    folder = small_checkpoint(models_dir() / "small")
    store = ModelStore(database_path())
    store.register(folder, source="convert", name="small", owned=True)
    store.close()
    for path in folder.iterdir():
        path.unlink()
    removed = pocketlm("rm", "small", "-y", home=pocket_home)
    assert removed.returncode == 0, removed.stderr
    store = ModelStore(database_path())
    try:
        assert store.list() == []
    finally:
        store.close()
