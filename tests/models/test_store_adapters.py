"""The store keeps an adapter's kind and base model, lists the adapters trained on a model (or on the model it was
converted from), and turns the old single 'lora' format into the three kinds when an older database is opened."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from pocketlm.models.database import connect, migrate
from pocketlm.models.store import _MIGRATIONS, ModelStore


def test_an_adapter_keeps_its_base_model(model_store: ModelStore, tiny_adapters: dict[str, Path], tiny_llama: Path) -> None:
    stored = model_store.register(tiny_adapters["rslora"], source="import")
    assert (stored.format, stored.quantization, stored.base_model, stored.is_adapter) == ("peft-lora", "rank 8, rsLoRA", str(tiny_llama), True)
    assert model_store.get(stored.name) == replace(stored, owned=False)
    renamed = model_store.register(tiny_adapters["second"], source="import", base_model="someone/tiny-llama")
    assert model_store.get(renamed.name).base_model == "someone/tiny-llama"  # type: ignore[union-attr]
    base = model_store.register(tiny_llama, source="import", name="tiny")
    assert (base.base_model, base.is_adapter) == ("", False)


def test_adapters_are_listed_under_their_base_and_the_models_converted_from_it(model_store: ModelStore, tiny_adapters: dict[str, Path],
                                                                               tiny_llama: Path, tiny_llama_f32_gguf: Path) -> None:  # fmt: skip
    base = model_store.register(tiny_llama, source="import", name="tiny")
    gguf = model_store.register(tiny_llama_f32_gguf, source="convert", name="tiny-f32", parent="tiny", lineage="convert f32")
    for name in ("plain", "second"):
        model_store.register(tiny_adapters[name], source="import")  # base_model: tiny_llama's path, as PEFT wrote it
    model_store.register(tiny_adapters["rslora"], source="import", base_model="someone/else")
    assert [m.name for m in model_store.adapters_of(base)] == ["plain", "second"]
    assert [m.name for m in model_store.adapters_of(gguf)] == ["plain", "second"]  # through its lineage
    by_repo = model_store.add(replace(base, name="tiny-from-hub", path=tiny_llama / "elsewhere", repo_id="Someone/Else"))
    assert [m.name for m in model_store.adapters_of(by_repo)] == ["rslora"]  # Hub repo ids compare without case


def test_old_lora_rows_become_the_three_adapter_kinds(pocket_home: Path) -> None:
    from pocketlm.models.locations import database_path

    legacy = connect(database_path())
    migrate(legacy, "models", _MIGRATIONS[:3])  # the schema before adapters had kinds
    rows = {"gguf-adapter": "/adapters/a.gguf", "mlx-adapter": "/adapters/mlx", "peft-adapter": "/adapters/peft", "a-model": "/models/m.gguf",
            "mlx-on-windows": "C:\\adapters\\mlx"}  # fmt: skip
    files = {"gguf-adapter": ["/adapters/a.gguf"], "mlx-adapter": ["/adapters/mlx/adapter_config.json", "/adapters/mlx/adapters.safetensors"],
             "mlx-on-windows": ["C:\\adapters\\mlx\\adapter_config.json", "C:\\adapters\\mlx\\adapters.safetensors"],
             "peft-adapter": ["/adapters/peft/adapter_config.json", "/adapters/peft/adapter_model.safetensors"], "a-model": ["/models/m.gguf"]}  # fmt: skip
    for name, path in rows.items():
        kind = "gguf" if name == "a-model" else "lora"
        legacy.execute("INSERT INTO models (name, path, format, architecture, parameter_count, quantization, context_length, size_bytes, source, added_at) "
                       "VALUES (?, ?, ?, 'llama', 1, 'rank 8', 0, 1, 'import', 1.0)", (name, path, kind))  # fmt: skip
        legacy.executemany("INSERT INTO model_files VALUES (?, ?, 0)", [(name, f) for f in files[name]])
    legacy.close()

    store = ModelStore(database_path())
    formats = {m.name: (m.format, m.base_model) for m in store.list()}
    assert formats == {"gguf-adapter": ("gguf-lora", ""), "mlx-adapter": ("mlx-lora", ""), "peft-adapter": ("peft-lora", ""), "a-model": ("gguf", ""),
                       "mlx-on-windows": ("mlx-lora", "")}  # fmt: skip
    store.close()
    with sqlite3.connect(database_path()) as check:
        assert check.execute("SELECT version FROM schema_versions WHERE component = 'models'").fetchone() == (len(_MIGRATIONS),)


def test_migrated_adapters_whose_files_exist_are_read_again_for_their_kind_and_base(pocket_home: Path, tiny_adapters: dict[str, Path],
                                                                                     tiny_llama: Path, tmp_path: Path) -> None:  # fmt: skip
    """Migration 4 guesses a kind from file names alone (an MLX folder registered by its folder only looks like PEFT's)
    and cannot know a base model; the store reads the files it can still find, once, when it opens."""
    import numpy as np
    from safetensors.numpy import save_file

    from pocketlm.models.locations import database_path

    mlx = tmp_path / "mlx-adapter"
    mlx.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.lora_a": np.zeros((64, 2), np.float32),
               "model.layers.0.self_attn.q_proj.lora_b": np.zeros((2, 64), np.float32)}, mlx / "adapters.safetensors")  # fmt: skip
    (mlx / "adapter_config.json").write_text('{"fine_tune_type": "lora", "lora_parameters": {"rank": 2, "scale": 1.0}, "model": "someone/tiny"}')
    legacy = connect(database_path())
    migrate(legacy, "models", _MIGRATIONS[:3])
    rows = {"mlx-by-folder": mlx, "peft": tiny_adapters["second"], "gone": tmp_path / "gone"}
    for name, path in rows.items():
        legacy.execute("INSERT INTO models (name, path, format, architecture, parameter_count, quantization, context_length, size_bytes, source, added_at) "
                       "VALUES (?, ?, 'lora', 'llama', 1, '', 0, 1, 'import', 1.0)", (name, str(path)))  # fmt: skip
        legacy.execute("INSERT INTO model_files VALUES (?, ?, 0)", (name, str(path)))  # the folder only, as old imports kept it
    legacy.close()

    store = ModelStore(database_path())
    found = {m.name: (m.format, m.base_model) for m in store.list()}
    assert found == {"mlx-by-folder": ("mlx-lora", "someone/tiny"), "peft": ("peft-lora", str(tiny_llama)), "gone": ("peft-lora", "")}
    assert store.get("peft").quantization == "rank 2"  # type: ignore[union-attr]
    store.close()
    (mlx / "adapter_config.json").write_text("{}")  # read once: a later open trusts the row
    store = ModelStore(database_path())
    assert store.get("mlx-by-folder").format == "mlx-lora"  # type: ignore[union-attr]
    store.close()
