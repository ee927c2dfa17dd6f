"""An adapter is checked against a base model from file headers before anything loads: it fits the model it was
trained on in every form pocketlm keeps it (checkpoint, GGUF, MLX, GPTQ), and one trained on another model —
more layers, another hidden size, another architecture — is refused with one sentence naming what differs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pocketlm.converters.base import ConvertOptions
from pocketlm.models.adapter_fit import check_adapter_fits
from pocketlm.models.peft_adapter import AdapterError, read_peft_adapter
from pocketlm.models.progress import ignore_progress
from tests.adapter_fixtures import build_peft_adapter
from tests.converters.tiny_models import SMALL


def tiny_base(destination: Path, config_class: str = "LlamaConfig", **changes: object) -> Path:
    """A random model like tiny_llama but for `changes` (no tokenizer: only its weights' shapes matter here)."""
    import torch
    import transformers

    config = getattr(transformers, config_class)(**{**SMALL, "vocab_size": 600, "tie_word_embeddings": False, **changes})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(destination)
    return destination


@pytest.fixture(scope="module")
def foreign_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters trained on models other than tiny_llama: three layers (changing the third), hidden size 32, and
    Phi-3 (fused qkv_proj and gate_up_proj, same widths)."""
    folder = tmp_path_factory.mktemp("foreign")
    deeper = tiny_base(folder / "llama-3-layers", num_hidden_layers=3)
    narrower = tiny_base(folder / "llama-hidden-32", hidden_size=32, intermediate_size=64)
    phi3 = tiny_base(folder / "phi3", "Phi3Config", pad_token_id=0, sliding_window=None)
    return {
        "deeper": build_peft_adapter(deeper, folder / "deeper-adapter", layers=[2]),
        "narrower": build_peft_adapter(narrower, folder / "narrower-adapter"),
        "phi3": build_peft_adapter(phi3, folder / "phi3-adapter", targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    }


def test_every_tiny_adapter_fits_its_base_as_a_checkpoint_and_as_a_gguf(tiny_adapters: dict[str, Path], tiny_llama: Path,
                                                                        tiny_llama_f32_gguf: Path) -> None:  # fmt: skip
    for folder in tiny_adapters.values():
        adapter = read_peft_adapter(folder)
        check_adapter_fits(adapter, tiny_llama)
        check_adapter_fits(adapter, tiny_llama_f32_gguf)


def test_an_adapter_fits_the_quantized_mlx_conversion_of_its_base(tiny_adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path) -> None:
    from pocketlm.converters.mlx import MLXConverter, MLXSettings, mlx_runtime_missing

    if missing := mlx_runtime_missing():
        pytest.skip(missing)
    # 3 bits: packed uint32 columns hold 32/3 weights, rounded down; the input width is still recovered exactly
    # because the group size divides the row.
    for bits in (4, 3):
        converted = MLXConverter().convert(tiny_llama, tmp_path / f"mlx-{bits}", ConvertOptions(settings=MLXSettings(bits=bits, group_size=32)), ignore_progress)
        for name in ("plain", "patterned"):
            check_adapter_fits(read_peft_adapter(tiny_adapters[name]), converted.path)
    float_mlx = MLXConverter().convert(tiny_llama, tmp_path / "mlx-f32", ConvertOptions(settings=MLXSettings(bits=None, dtype="float32")), ignore_progress)
    check_adapter_fits(read_peft_adapter(tiny_adapters["plain"]), float_mlx.path)


def test_an_adapter_fits_the_gptq_quantization_of_its_base(tiny_adapters: dict[str, Path], tiny_llama: Path, tmp_path: Path) -> None:
    from pocketlm.converters.gptq import GPTQConverter, GPTQSettings

    options = ConvertOptions(settings=GPTQSettings(bits=4, group_size=32))
    gptq = GPTQConverter().convert(tiny_llama, tmp_path / "gptq", options, ignore_progress).path
    check_adapter_fits(read_peft_adapter(tiny_adapters["plain"]), gptq)


def test_an_adapter_changing_a_layer_the_base_lacks_is_refused_naming_it(foreign_adapters: dict[str, Path], tiny_llama: Path,
                                                                         tiny_llama_f32_gguf: Path) -> None:  # fmt: skip
    adapter = read_peft_adapter(foreign_adapters["deeper"])
    trained_on = f"(its base is {adapter.base_model})"
    with pytest.raises(AdapterError) as refused:
        check_adapter_fits(adapter, tiny_llama, "tiny-llama")
    assert refused.value.message == f"deeper-adapter changes layer 2, but tiny-llama has only 2 layers: it was trained on another model {trained_on}."
    assert adapter.base_model in refused.value.hint
    with pytest.raises(AdapterError, match=re.escape("changes layer 2, but tiny-llama-f32.gguf has only 2 layers")):
        check_adapter_fits(adapter, tiny_llama_f32_gguf)


def test_an_adapter_for_another_hidden_size_is_refused_naming_the_widths(foreign_adapters: dict[str, Path], tiny_llama: Path,
                                                                         tiny_llama_f32_gguf: Path) -> None:  # fmt: skip
    adapter = read_peft_adapter(foreign_adapters["narrower"])
    # The first module in path order is layer 0's mlp.down_proj: 64 inputs (the narrow model's feed-forward) vs 128.
    expected = f"narrower-adapter's mlp.down_proj takes 64 inputs but tiny's takes 128: it was trained on a model of another size (its base is {adapter.base_model})."
    for base in (tiny_llama, tiny_llama_f32_gguf):
        with pytest.raises(AdapterError) as refused:
            check_adapter_fits(adapter, base, "tiny")
        assert refused.value.message == expected


def test_an_adapter_for_another_architecture_is_refused_naming_the_module(foreign_adapters: dict[str, Path], tiny_llama: Path,
                                                                          tiny_llama_f32_gguf: Path) -> None:  # fmt: skip
    adapter = read_peft_adapter(foreign_adapters["phi3"])
    # Phi-3's down_proj has Llama's widths; its fused gate_up_proj is what Llama lacks.
    for base in (tiny_llama, tiny_llama_f32_gguf):
        with pytest.raises(AdapterError) as refused:
            check_adapter_fits(adapter, base, "tiny")
        assert refused.value.message.startswith("phi3-adapter changes model.layers.0.mlp.gate_up_proj, which tiny does not have: it was trained on another kind of model")


def test_an_adapter_is_not_attached_to_another_adapter(tiny_adapters: dict[str, Path]) -> None:
    with pytest.raises(AdapterError, match="second is itself an adapter"):
        check_adapter_fits(read_peft_adapter(tiny_adapters["plain"]), tiny_adapters["second"])


def test_an_mlx_lm_adapter_is_checked_the_same_way(tiny_llama: Path, foreign_adapters: dict[str, Path], tmp_path: Path) -> None:
    from pocketlm.converters.mlx import mlx_runtime_missing
    from pocketlm.models.mlx_adapter import read_mlx_adapter
    from tests.models.test_adapter_formats import mlx_trained_adapter

    if missing := mlx_runtime_missing():
        pytest.skip(missing)
    adapter = read_mlx_adapter(mlx_trained_adapter(tiny_llama, tmp_path / "mlx-adapter"))
    check_adapter_fits(adapter, tiny_llama)
    narrower = foreign_adapters["narrower"].parent / "llama-hidden-32"
    with pytest.raises(AdapterError) as refused:
        check_adapter_fits(adapter, narrower)
    assert refused.value.message == "mlx-adapter's mlp.down_proj takes 128 inputs but llama-hidden-32's takes 64: it was trained on a model of another size (its base is someone/tiny-llama)."


def test_an_adapter_on_lm_head_fits_a_base_whose_head_is_its_tied_embedding(tiny_llama: Path, tmp_path: Path) -> None:
    # The tied base has no lm_head.weight; its embedding (vocab × hidden) is the head it multiplies by. PEFT saves the
    # head's whole base weight beside the LoRA when lm_head is a target (save_embedding_layers="auto"), which
    # read_peft_adapter refuses; save_pretrained(save_embedding_layers=False) leaves it out, as done here.
    folder = build_peft_adapter(tiny_llama, tmp_path / "head-adapter", targets=("lm_head", "q_proj"), save_embedding_layers=False)
    adapter = read_peft_adapter(folder)
    assert "lm_head" in {m.module for m in adapter.modules}
    check_adapter_fits(adapter, tiny_base(tmp_path / "tied", tie_word_embeddings=True))
