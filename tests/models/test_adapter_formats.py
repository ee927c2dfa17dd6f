"""The three adapter formats are told apart from their files — PEFT's folder, mlx-lm's folder, a GGUF LoRA — each with
its rank, size and base model; mlx-lm adapters are read as mlx-lm writes and loads them, DoRA and full fine-tunes
refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketlm.models.formats import ADAPTER_FORMATS, ModelFormat, inspect_model
from pocketlm.models.mlx_adapter import read_mlx_adapter
from pocketlm.models.peft_adapter import AdapterError, read_peft_adapter


def mlx_trained_adapter(base: Path, destination: Path, fine_tune_type: str = "lora", scale: float = 10.0) -> Path:
    """An adapter saved the way mlx-lm's trainer saves one (mlx_lm.lora.train_model and the trainer's final save):
    the model frozen, its last layers' linears wrapped by linear_to_lora_layers, the trainable parameters written
    with mx.save_safetensors and the run's arguments with save_config. lora_b gets random values instead of training."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config

    model, _ = load_model(base)
    model.freeze()
    parameters = {"rank": 4, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 2, parameters, use_dora=fine_tune_type == "dora")
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    destination.mkdir(parents=True)
    mx.save_safetensors(str(destination / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    args = {"model": "someone/tiny-llama", "fine_tune_type": fine_tune_type, "num_layers": 2, "lora_parameters": parameters,
            "adapter_path": str(destination), "iters": 10, "batch_size": 1}  # fmt: skip
    save_config(args, destination / "adapter_config.json")
    return destination


@pytest.fixture(scope="module")
def mlx_lm_base(tiny_llama: Path) -> Path:
    from pocketlm.converters.mlx import mlx_runtime_missing

    if missing := mlx_runtime_missing():
        pytest.skip(missing)
    return tiny_llama


def test_adapter_formats_are_the_three_kinds() -> None:
    assert ADAPTER_FORMATS == {"peft-lora", "gguf-lora", "mlx-lora"}
    assert not hasattr(ModelFormat, "LORA")


def test_peft_adapters_show_rank_rslora_size_and_base(tiny_adapters: dict[str, Path], tiny_llama: Path) -> None:
    expected = {"plain": "rank 4", "rslora": "rank 8, rsLoRA", "patterned": "ranks 2-4", "second": "rank 2"}
    for name, folder in tiny_adapters.items():
        facts = inspect_model(folder)
        assert (facts.format, facts.architecture, facts.quantization, facts.base_model) == (ModelFormat.PEFT_LORA, "lora", expected[name], str(tiny_llama))
        assert facts.parameter_count == read_peft_adapter(folder).parameter_count
        assert [f.name for f in facts.files] == ["adapter_config.json", "adapter_model.safetensors"]
    # rank 4, every projection of both layers: A is 4 × in and B out × 4, so 4 · (in + out) per module.
    widths = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64), "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    assert inspect_model(tiny_adapters["plain"]).parameter_count == 2 * sum(4 * (i + o) for i, o in widths.values())


def test_a_dora_peft_adapter_is_refused_on_import(tiny_llama: Path, tmp_path: Path) -> None:
    from tests.adapter_fixtures import build_peft_adapter

    with pytest.raises(AdapterError, match="DoRA"):
        inspect_model(build_peft_adapter(tiny_llama, tmp_path / "dora", use_dora=True, targets=("v_proj",)))


def test_an_mlx_lm_adapter_is_read_as_mlx_lm_writes_it(mlx_lm_base: Path, tmp_path: Path) -> None:
    folder = mlx_trained_adapter(mlx_lm_base, tmp_path / "mlx-adapter")
    adapter = read_mlx_adapter(folder)
    assert (adapter.scale, adapter.rank, adapter.num_layers, adapter.base_model) == (10.0, 4, 2, "someone/tiny-llama")
    assert [(m.module, m.in_features, m.out_features, m.rank) for m in adapter.modules] == [
        (f"model.layers.{layer}.{name}", width_in, width_out, 4)
        for layer in (0, 1) for name, width_in, width_out in (("mlp.down_proj", 128, 64), ("self_attn.q_proj", 64, 64))
    ]  # fmt: skip
    facts = inspect_model(folder)
    assert (facts.format, facts.architecture, facts.quantization, facts.base_model) == (ModelFormat.MLX_LORA, "lora", "rank 4", "someone/tiny-llama")
    assert facts.parameter_count == 2 * 4 * ((128 + 64) + (64 + 64))


def test_mlx_lm_loads_the_adapter_the_reader_describes(mlx_lm_base: Path, tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    folder = mlx_trained_adapter(mlx_lm_base, tmp_path / "mlx-adapter")
    model, _ = load_model(mlx_lm_base)
    load_adapters(model, str(folder))
    adapter = read_mlx_adapter(folder)
    for module in adapter.modules:
        layer = model.layers[module.layer].self_attn.q_proj if module.short_name == "self_attn.q_proj" else model.layers[module.layer].mlp.down_proj
        assert (layer.lora_a.shape, layer.lora_b.shape, layer.scale) == ((module.in_features, module.rank), (module.rank, module.out_features), adapter.scale)
        assert mx.abs(layer.lora_b).max().item() > 0


@pytest.mark.parametrize(("kind", "words"), [("dora", "is an mlx-lm DoRA adapter"), ("full", "is an mlx-lm full fine-tune")])
def test_mlx_lm_dora_and_full_fine_tunes_are_refused(mlx_lm_base: Path, tmp_path: Path, kind: str, words: str) -> None:
    folder = mlx_trained_adapter(mlx_lm_base, tmp_path / kind, fine_tune_type="dora")
    if kind == "full":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "full"}))
    with pytest.raises(AdapterError, match=words):
        read_mlx_adapter(folder)
    with pytest.raises(AdapterError, match=words):
        inspect_model(folder)


def test_a_gguf_lora_names_its_base_architecture_rank_and_base_model(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "adapter.gguf"
    writer = GGUFWriter(path, "qwen2")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, "Qwen2.5 0.5B Instruct")
    writer.add_base_model_repo_url(0, "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct")
    for layer in (0, 1):
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_a", np.zeros((16, 64), dtype=np.float32))  # numpy: rank × in
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_b", np.zeros((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    facts = inspect_model(path)
    assert (facts.format, facts.architecture, facts.quantization, facts.base_model) == (ModelFormat.GGUF_LORA, "qwen2", "rank 16", "Qwen/Qwen2.5-0.5B-Instruct")
    assert facts.parameter_count == 2 * 2 * 16 * 64 and facts.location == path
