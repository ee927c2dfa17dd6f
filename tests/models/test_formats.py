"""What a model is, read from its files: a GGUF LoRA adapter is an adapter, a GPTQ folder says its settings."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pocketlm.models.formats import ModelFormat, inspect_model, read_gptq_facts
from pocketlm.models.store import ModelStore
from tests.backends.tiny_gguf import write_tiny_llama_gguf


def write_lora_gguf(path: Path) -> Path:
    """A LoRA adapter as llama.cpp's convert_lora_to_gguf writes one: general.type "adapter", lora_a/lora_b pairs."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gptq_checkpoint(folder: Path, group_size: int = 128, desc_act: bool = False) -> Path:
    """A GPTQ folder as transformers saves one: quantization_config in config.json, packed int32 qweight beside scales."""
    folder.mkdir(parents=True)
    quantization = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": True}
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quantization}))
    tensors = {"layer.qweight": ("I32", [8, 64]), "layer.scales": ("F16", [1, 64]), "layer.qzeros": ("I32", [1, 8])}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = shape[0] * shape[1] * (4 if dtype == "I32" else 2)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))
    return folder


def test_a_gguf_lora_adapter_is_listed_as_an_adapter_not_a_chat_model(model_store: ModelStore, tmp_path: Path) -> None:
    adapter = write_lora_gguf(tmp_path / "adapter.gguf")
    assert inspect_model(adapter).format == ModelFormat.GGUF_LORA
    stored = model_store.register(adapter, source="import")
    assert (stored.format, stored.path, stored.architecture, stored.quantization) == ("gguf-lora", adapter, "llama", "rank 8")


def test_a_gguf_model_stays_a_gguf_model(tmp_path: Path) -> None:
    assert inspect_model(write_tiny_llama_gguf(tmp_path / "tiny.gguf")).format == ModelFormat.GGUF


def test_a_gptq_checkpoint_says_its_bits_group_size_and_act_order(tmp_path: Path) -> None:
    plain = inspect_model(gptq_checkpoint(tmp_path / "plain"))
    assert (plain.format, plain.quantization) == (ModelFormat.GPTQ, "GPTQ 4-bit g128")
    assert plain.parameter_count == 8 * 64 * 8  # each int32 of qweight packs eight 4-bit weights; scales and zeros are not weights
    ordered = inspect_model(gptq_checkpoint(tmp_path / "ordered", group_size=32, desc_act=True))
    assert ordered.quantization == "GPTQ 4-bit g32 act-order"
    facts = read_gptq_facts(tmp_path / "ordered")
    assert facts is not None and (facts.bits, facts.group_size, facts.act_order) == (4, 32, True)
    assert inspect_model(gptq_checkpoint(tmp_path / "columns", group_size=-1)).quantization == "GPTQ 4-bit per-column"


def test_a_plain_checkpoint_has_no_gptq_facts(tmp_path: Path) -> None:
    from tests.models.test_model_reference import small_checkpoint

    assert read_gptq_facts(small_checkpoint(tmp_path / "float")) is None


def mlx_folder(folder: Path, quantization: dict, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """An MLX folder as mlx-lm saves one: `quantization` in config.json, packed uint32 weights beside scales/biases."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": quantization}))
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = shape[0] * shape[1] * (4 if dtype == "U32" else 2)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "mlx"}
    encoded = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(offset))
    return folder


# Two 64×64 linear layers packed as mlx-lm writes them: 64 columns at b bits are 64·b/32 uint32 words per row.
def _packed(bits: int) -> tuple[str, list[int]]:
    return ("U32", [64, 64 * bits // 32])


def test_an_mlx_folder_says_its_bits_and_group_size(tmp_path: Path) -> None:
    tensors = {"model.layers.0.mlp.down_proj.weight": _packed(4), "model.layers.0.mlp.down_proj.scales": ("F16", [64, 2]),
               "model.layers.0.mlp.down_proj.biases": ("F16", [64, 2])}  # fmt: skip
    facts = inspect_model(mlx_folder(tmp_path / "m", {"group_size": 32, "bits": 4, "mode": "affine"}, tensors))
    assert (facts.format, facts.quantization, facts.parameter_count) == (ModelFormat.MLX, "4-bit g32", 64 * 64)


def test_an_mlx_folder_made_with_a_mixed_recipe_says_mixed_and_the_bits_it_uses(tmp_path: Path) -> None:
    # mlx-lm's mixed_3_6: the top-level bits (4) are only a default, every quantized layer has its own entry.
    quantization = {"group_size": 64, "bits": 4, "mode": "affine",
                    "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6, "mode": "affine"},
                    "model.layers.0.mlp.up_proj": {"group_size": 64, "bits": 3, "mode": "affine"}}  # fmt: skip
    tensors = {"model.layers.0.mlp.down_proj.weight": _packed(6), "model.layers.0.mlp.up_proj.weight": _packed(3),
               "model.layers.0.mlp.up_proj.scales": ("F16", [64, 1])}  # fmt: skip
    facts = inspect_model(mlx_folder(tmp_path / "m", quantization, tensors))
    assert facts.format == ModelFormat.MLX and facts.quantization == "mixed 3/6-bit g64"
    assert facts.parameter_count == 2 * 64 * 64  # each layer unpacked at its own bits, not the top-level 4
