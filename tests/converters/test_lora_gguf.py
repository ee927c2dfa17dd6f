"""PEFT LoRA → GGUF LoRA: the file llama.cpp reads (names, layout, alpha, q/k row order), and the refusals.

What llama.cpp computes with these files is tested against PEFT in tests/backends/test_llamacpp_adapters.py."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from pocketlm.converters.adapter_settings import AdapterConversionSettings
from pocketlm.converters.base import ConversionError, ConvertOptions
from pocketlm.converters.gguf_architectures import undo_rotary_permutation
from pocketlm.converters.lora_gguf import PeftToGGUFLora
from pocketlm.models.errors import Cancelled
from pocketlm.models.peft_adapter import AdapterError, read_peft_adapter
from pocketlm.models.progress import ProgressUpdate, ignore_progress
from tests.adapter_fixtures import build_peft_adapter


def convert(peft: Path, base: Path | None, destination: Path, outtype: str = "auto", **options: object) -> Path:
    settings = AdapterConversionSettings(base=base, outtype=outtype)
    return PeftToGGUFLora().convert(peft, destination, ConvertOptions(settings=settings, **options), ignore_progress).path  # type: ignore[arg-type]


def read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray], dict[str, str]]:
    """(metadata, tensors as float32 in numpy (rows, columns) order, tensor types) of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors, types = {}, {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        types[tensor.name] = tensor.tensor_type.name
    return fields, tensors, types


def test_the_file_is_a_gguf_lora_with_llama_cpp_names_and_layout(tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    fields, tensors, types = read(convert(tiny_adapters["plain"], tiny_llama_f32_gguf, tmp_path / "plain.gguf"))
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    # 2 layers × 7 projections, an A and a B each, named after the base's GGUF tensors.
    assert len(tensors) == 28 and set(types.values()) == {"F32"}  # auto keeps an f32 adapter in f32
    peft = read_peft_adapter(tiny_adapters["plain"])
    a, b = peft.load_pair(next(m for m in peft.modules if m.module == "model.layers.1.mlp.down_proj"))
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_a"], a)  # rank × in
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_b"], b)  # out × rank


def test_q_and_k_rows_of_b_are_permuted_as_the_base_converter_permuted_the_weights(tiny_adapters: dict[str, Path], tiny_llama: Path,
                                                                                   tmp_path: Path) -> None:  # fmt: skip
    _, tensors, _ = read(convert(tiny_adapters["plain"], tiny_llama, tmp_path / "plain.gguf"))
    peft = read_peft_adapter(tiny_adapters["plain"])
    config = json.loads((tiny_llama / "config.json").read_text())
    for module, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v")):
        a, b = peft.load_pair(next(m for m in peft.modules if m.module == f"model.layers.0.{module}"))
        expected = undo_rotary_permutation(f"model.layers.0.{module}.weight", b, config)
        np.testing.assert_array_equal(tensors[f"blk.0.{name}.weight.lora_b"], expected)
        np.testing.assert_array_equal(tensors[f"blk.0.{name}.weight.lora_a"], a)  # A's columns meet x, which is not permuted
        if name != "attn_v":
            assert not np.array_equal(expected, b)  # the permutation does move rows: the check above is not vacuous


def test_an_hf_folder_and_its_gguf_give_the_same_adapter(tiny_adapters: dict[str, Path], tiny_llama: Path, tiny_llama_f32_gguf: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    _, from_folder, _ = read(convert(tiny_adapters["patterned"], tiny_llama, tmp_path / "a.gguf"))
    _, from_gguf, _ = read(convert(tiny_adapters["patterned"], tiny_llama_f32_gguf, tmp_path / "b.gguf"))
    assert from_folder.keys() == from_gguf.keys()
    for name in from_folder:
        np.testing.assert_array_equal(from_folder[name], from_gguf[name])


def test_rslora_is_honoured_through_the_files_alpha(tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    """llama.cpp applies alpha / rank; PEFT's rsLoRA alpha / √rank: the file says alpha·√rank (4·√8) and B is unchanged."""
    fields, tensors, types = read(convert(tiny_adapters["rslora"], tiny_llama_f32_gguf, tmp_path / "rs.gguf"))
    assert fields["adapter.lora.alpha"] == pytest.approx(4.0 * math.sqrt(8), rel=1e-6)
    assert set(types.values()) == {"F16"}  # auto: a bf16-trained adapter is written in f16
    peft = read_peft_adapter(tiny_adapters["rslora"])
    _, b = peft.load_pair(next(m for m in peft.modules if m.module == "model.layers.0.mlp.up_proj"))
    np.testing.assert_allclose(tensors["blk.0.ffn_up.weight.lora_b"], b, rtol=1e-3, atol=1e-6)


def test_rank_and_alpha_patterns_are_folded_into_b(tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    """"patterned": r 4, alpha 8 (factor 2); down_proj rank 2 (PEFT factor 8/2 = 4, llama.cpp's 8/2: nothing to fold);
    q_proj alpha 3 (PEFT 3/4, llama.cpp 8/4: B × 3/8); layer 1 only."""
    fields, tensors, _ = read(convert(tiny_adapters["patterned"], tiny_llama_f32_gguf, tmp_path / "p.gguf"))
    assert fields["adapter.lora.alpha"] == 8.0
    assert {name.split(".")[1] for name in tensors} == {"1"}
    peft = read_peft_adapter(tiny_adapters["patterned"])
    pair = {m.short_name: peft.load_pair(m) for m in peft.modules}
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_b"], pair["mlp.down_proj"][1])
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape == (2, 128)
    config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    expected_q = undo_rotary_permutation("model.layers.1.self_attn.q_proj.weight", pair["self_attn.q_proj"][1] * np.float32(3 / 8), config)
    np.testing.assert_allclose(tensors["blk.1.attn_q.weight.lora_b"], expected_q, rtol=1e-6)


@pytest.mark.parametrize(("outtype", "tensor_type"), [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16")])
def test_each_outtype_is_written(outtype: str, tensor_type: str, tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    _, tensors, types = read(convert(tiny_adapters["second"], tiny_llama_f32_gguf, tmp_path / "s.gguf", outtype))
    assert set(types.values()) == {tensor_type}
    peft = read_peft_adapter(tiny_adapters["second"])
    a, _ = peft.load_pair(next(m for m in peft.modules if m.module == "model.layers.0.self_attn.v_proj"))
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_a"], a, rtol=1e-2, atol=1e-4)


def test_without_a_base_the_conversion_is_refused_with_a_sentence(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="needs the base model") as refusal:
        convert(tiny_adapters["plain"], None, tmp_path / "x.gguf")
    assert refusal.value.hint
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tiny_adapters["plain"], tmp_path / "nowhere", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_base_of_an_unsupported_architecture_is_refused(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="GPT2LMHeadModel"):
        convert(tiny_adapters["plain"], base, tmp_path / "x.gguf")


def test_an_adapter_gguf_is_not_a_base(tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    adapter = convert(tiny_adapters["second"], tiny_llama_f32_gguf, tmp_path / "second.gguf")
    with pytest.raises(ConversionError, match="is a GGUF adapter, not a model"):
        convert(tiny_adapters["plain"], adapter, tmp_path / "x.gguf")


def test_lm_head_on_a_tied_base_is_refused_with_a_sentence(tiny_llama: Path, tmp_path: Path) -> None:
    from tests.converters.tiny_models import build_tiny_model

    # PEFT also saves lm_head's own weight when it adapts it (save_embedding_layers="auto"); a LoRA-only save has not.
    peft = build_peft_adapter(tiny_llama, tmp_path / "head", targets=("q_proj", "lm_head"), save_embedding_layers=False)
    _, tensors, _ = read(convert(peft, tiny_llama, tmp_path / "untied.gguf"))
    assert tensors["output.weight.lora_b"].shape == (600, 4)  # an untied base has an output matrix to adapt
    tied = build_tiny_model("llama-tied", tmp_path / "tied", tiny_llama, vocab_size=600)
    with pytest.raises(ConversionError, match="lm_head.*tied"):
        convert(peft, tied, tmp_path / "x.gguf")


def test_an_embedding_lora_is_refused_with_a_sentence(tiny_llama: Path, tmp_path: Path) -> None:
    """llama.cpp's token embedding LoRA has its own layout (A and B swapped); pocketlm does not write it yet."""
    peft = build_peft_adapter(tiny_llama, tmp_path / "embed", targets=("embed_tokens",), save_embedding_layers=False)  # the LoRA matrices alone
    with pytest.raises(AdapterError, match="embed_tokens") as refusal:
        convert(peft, tiny_llama, tmp_path / "x.gguf")
    assert refusal.value.hint
    assert list(tmp_path.glob("*.gguf")) == []


def test_an_adapter_for_another_model_is_refused(tiny_llama: Path, tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.converters.tiny_models import SMALL

    config = LlamaConfig(**{**SMALL, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "vocab_size": 600})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "other")
    deeper = build_peft_adapter(tmp_path / "other", tmp_path / "deep", layers=[2])
    # models/adapter_fit's sentences: the converters check a base as the backends do.
    with pytest.raises(AdapterError, match="deep changes layer 2, but .* has only 2 layers: it was trained on another model"):
        convert(deeper, tiny_llama_f32_gguf, tmp_path / "x.gguf")
    narrower = build_peft_adapter(tmp_path / "other", tmp_path / "narrow", layers=[0])
    with pytest.raises(AdapterError, match=r"narrow's mlp.down_proj takes 64 inputs but llama's takes 128: it was trained on a model of another size"):
        convert(narrower, tiny_llama, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_progress_counts_the_modules_and_cancel_leaves_nothing(tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    updates: list[ProgressUpdate] = []
    settings = AdapterConversionSettings(base=tiny_llama_f32_gguf)
    PeftToGGUFLora().convert(tiny_adapters["plain"], tmp_path / "p.gguf", ConvertOptions(settings=settings), updates.append)
    assert [u.completed for u in updates] == list(range(15)) and {u.total for u in updates} == {14}
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        PeftToGGUFLora().convert(tiny_adapters["plain"], tmp_path / "c.gguf", ConvertOptions(settings=settings, cancel=cancel), ignore_progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gguf"]


def split_gguf(source: Path, destination: Path, tensors_per_part: int) -> list[Path]:
    """`source` rewritten as a split GGUF (x-00001-of-0000N.gguf, ...), as llama.cpp's gguf-split writes one."""
    import gguf

    reader = gguf.GGUFReader(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(destination, str(reader.fields["general.architecture"].contents()), split_max_tensors=tensors_per_part)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(destination.parent.glob(f"{destination.stem}-*-of-*.gguf"))


def test_a_split_gguf_base_gives_the_same_adapter_as_the_whole_file(tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    parts = split_gguf(tiny_llama_f32_gguf, tmp_path / "split" / "tiny.gguf", tensors_per_part=8)
    assert len(parts) >= 3  # the later layers' weights are only in the later parts
    _, whole, _ = read(convert(tiny_adapters["plain"], tiny_llama_f32_gguf, tmp_path / "whole.gguf"))
    _, split, _ = read(convert(tiny_adapters["plain"], parts[0], tmp_path / "from-split.gguf"))
    assert whole.keys() == split.keys()
    for name, tensor in whole.items():
        np.testing.assert_array_equal(split[name], tensor, err_msg=name)
