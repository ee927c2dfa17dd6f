"""GPTQ: a float checkpoint becomes a standard GPTQ folder (packed int32 weights, float16 scales, v1 zeros) that
transformers loads through its own GPTQ path, calibrated well enough to beat plain round-to-nearest."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from pocketlm.converters.base import ConversionError, ConvertOptions
from pocketlm.converters.calibration import HELD_OUT_TEXT
from pocketlm.converters.gptq import GPTQConverter, GPTQSettings
from pocketlm.models.errors import Cancelled
from pocketlm.models.progress import ProgressUpdate, ignore_progress
from tests.converters.tiny_models import build_tiny_model, train_sentencepiece_tokenizer

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer llama (hidden 64, feed-forward 128) with a real SentencePiece tokenizer."""
    folder = tmp_path_factory.mktemp("gptq-tiny")
    return build_tiny_model("llama", folder / "llama", train_sentencepiece_tokenizer(folder / "tokenizer"), vocab_size=600)


def quantize(source: Path, destination: Path, **settings: object) -> Path:
    return GPTQConverter().convert(source, destination, ConvertOptions(settings=GPTQSettings(**settings)), ignore_progress).path  # type: ignore[arg-type]


def tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned `bits`-wide fields of int32 words, lowest bits first, laid out along `axis` (0: rows, 1: columns).
    Written from the format's description, independently of the converter's packer."""
    words = packed.view(np.uint32)
    fields = [(words >> np.uint32(bits * j)) & np.uint32(2**bits - 1) for j in range(32 // bits)]
    stacked = np.stack(fields, axis=axis + 1)  # [rows, fields, columns] or [rows, columns, fields]
    shape = (packed.shape[0] * len(fields), packed.shape[1]) if axis == 0 else (packed.shape[0], packed.shape[1] * len(fields))
    return stacked.reshape(shape).astype(np.int64)


def dequantize(stored: dict[str, np.ndarray], prefix: str, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The float weight [out, in] a GPTQ v1 loader computes, and the quantization step of each of its entries."""
    codes = unpack(stored[f"{prefix}.qweight"], bits, axis=0)  # [in, out]
    zeros = unpack(stored[f"{prefix}.qzeros"], bits, axis=1) + 1  # v1 stores zero − 1
    scales = stored[f"{prefix}.scales"].astype(np.float32)
    g_idx = stored[f"{prefix}.g_idx"].astype(np.int64)
    weight = (codes - zeros[g_idx]) * scales[g_idx]
    return weight.T, scales[g_idx].T


def source_weights(checkpoint: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def test_tiny_model_becomes_a_gptq_folder_with_the_standard_tensors_and_config(tiny_llama: Path, tmp_path: Path) -> None:
    updates: list[ProgressUpdate] = []
    result = GPTQConverter().convert(tiny_llama, tmp_path / "out", ConvertOptions(settings=GPTQSettings(bits=4, group_size=32)), updates.append)
    assert result.how == "GPTQ 4-bit g32"
    assert [(u.description, u.completed, u.total) for u in updates] == [("Quantizing layer 1 of 2", 1, 2), ("Quantizing layer 2 of 2", 2, 2)]
    stored = tensors(result.path)
    for layer in (0, 1):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            out, inputs = source_weights(tiny_llama)[f"{prefix}.weight"].shape
            assert f"{prefix}.weight" not in stored
            assert stored[f"{prefix}.qweight"].dtype == np.int32 and stored[f"{prefix}.qweight"].shape == (inputs * 4 // 32, out)
            assert stored[f"{prefix}.qzeros"].dtype == np.int32 and stored[f"{prefix}.qzeros"].shape == (inputs // 32, out * 4 // 32)
            assert stored[f"{prefix}.scales"].dtype == np.float16 and stored[f"{prefix}.scales"].shape == (inputs // 32, out)
            assert stored[f"{prefix}.g_idx"].dtype == np.int32 and list(stored[f"{prefix}.g_idx"]) == [i // 32 for i in range(inputs)]
            # Symmetric 4-bit: zero point 8, stored as 7 in every nibble (0x77777777).
            assert (stored[f"{prefix}.qzeros"].view(np.uint32) == 0x77777777).all()
    assert stored["model.embed_tokens.weight"].dtype == np.float16  # embeddings and head stay float
    assert stored["lm_head.weight"].shape == source_weights(tiny_llama)["lm_head.weight"].shape
    config = json.loads((result.path / "config.json").read_text())
    quant = config["quantization_config"]
    assert {k: quant[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}  # fmt: skip
    assert json.loads((result.path / "quantize_config.json").read_text()) == quant
    assert config["architectures"] == ["LlamaForCausalLM"]
    for side_file in ("tokenizer.model", "tokenizer_config.json"):
        assert (result.path / side_file).read_bytes() == (tiny_llama / side_file).read_bytes()


@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(4, 32, False), (8, 64, False), (4, 32, True), (4, -1, False), (2, 32, False)])
def test_packed_weights_dequantize_close_to_the_float_weights(tiny_llama: Path, tmp_path: Path, bits: int, group_size: int, act_order: bool) -> None:
    folder = quantize(tiny_llama, tmp_path / "out", bits=bits, group_size=group_size, act_order=act_order)
    stored, original = tensors(folder), source_weights(tiny_llama)
    for layer in (0, 1):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            weight, step = dequantize(stored, prefix, bits)
            assert unpack(stored[f"{prefix}.qweight"], bits, axis=0).max() < 2**bits
            g_idx = stored[f"{prefix}.g_idx"]
            group = g_idx.size if group_size == -1 else group_size
            assert sorted(np.bincount(g_idx)) == [group] * (g_idx.size // group)  # act-order reorders, never resizes
            # Round-to-nearest stays within half a step (one at the clipped top of the grid); GPTQ moves a weight
            # further where that cancels its neighbours' error on the calibration inputs, but on average it stays
            # close: measured mean 0.28–0.41 steps per matrix, largest single move 2.4–3.6 steps, in every setting here.
            # A packing or scale error is off by whole groups of steps (or by 2^bits), far past these bounds.
            distance = np.abs(weight - original[f"{prefix}.weight"]) / step
            assert distance.mean() < 0.6, f"{prefix}: mean distance {distance.mean():.2f} steps"
            assert distance.max() < 6, f"{prefix}: max distance {distance.max():.2f} steps"


def test_gptq_reproduces_a_layer_output_better_than_round_to_nearest() -> None:
    """GPTQ's whole point, on one matrix: its output error on the calibration inputs is well below RTN's."""
    import torch

    from pocketlm.converters.gptq_solver import gptq_quantize, round_to_nearest

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 256, generator=generator)
    # Correlated inputs, as real activations are (a few directions carry most of the energy): measured ratios to
    # round-to-nearest 0.14 (act-order 0.10); on independent inputs GPTQ has less to exploit (about 0.7).
    inputs = torch.randn(400, 64, generator=generator) @ torch.randn(64, 256, generator=generator) + 0.3 * torch.randn(400, 256, generator=generator)
    hessian = inputs.T @ inputs / len(inputs)

    def output_error(dequantized: torch.Tensor) -> float:
        return float(((dequantized - weight) @ inputs.T).pow(2).mean())

    rtn = output_error(round_to_nearest(weight, 4, 64).dequantized)
    for act_order in (False, True):
        gptq = output_error(gptq_quantize(weight, hessian, 4, 64, act_order, 0.01).dequantized)
        assert gptq < 0.4 * rtn, f"act_order={act_order}: GPTQ {gptq:.3f} vs round-to-nearest {rtn:.3f}"


def test_clipped_group_scales_never_round_a_group_worse_than_its_full_range() -> None:
    import torch

    from pocketlm.converters.gptq_solver import _dequantized, clipped_scales, group_scales

    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(64, 200, generator=generator) * torch.rand(1, 200, generator=generator)
    full, chosen = group_scales(weights, 4, dim=0), clipped_scales(weights, 4)

    def error(scale: torch.Tensor) -> torch.Tensor:
        return (_dequantized(weights, scale, 4) - weights).abs().pow(2.4).sum(dim=0)

    assert (chosen <= full).all() and (chosen >= 0.8 * full).all()
    assert (error(chosen) <= error(full)).all()
    assert (chosen < full).any()  # on Gaussian weights, clipping the largest pays for some groups
    assert torch.equal(clipped_scales(torch.zeros(64, 3), 4), group_scales(torch.zeros(64, 3), 4, dim=0))  # zeros stay usable


def calibration_of_several_chunks(tiny_llama: Path) -> tuple[str, list[list[int]]]:
    """A calibration text of at least three 512-token chunks for the tiny model, the last one shorter."""
    from transformers import AutoTokenizer

    from pocketlm.converters.calibration import BUILTIN_CALIBRATION_TEXT
    from pocketlm.converters.gptq_walk import calibration_token_chunks

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = BUILTIN_CALIBRATION_TEXT
    while len(calibration_token_chunks(tokenizer, text)) < 3 or len(calibration_token_chunks(tokenizer, text)[-1]) == 512:
        text += BUILTIN_CALIBRATION_TEXT[: len(text) // 3]
    return text, calibration_token_chunks(tokenizer, text)


def test_every_chunk_reaches_each_layer_as_the_float_model_computes_it_and_fills_one_hessian(tiny_llama: Path) -> None:
    """Before any quantization, what the walk feeds each layer for each chunk (a shorter last one included) is exactly
    the model's own hidden state, and a group's Hessian is XᵀX/n over every token of every chunk."""
    import torch
    from transformers import AutoModelForCausalLM

    from pocketlm.converters import gptq_walk as gptq

    _, chunks = calibration_of_several_chunks(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    layers = gptq._decoder_layers(model)
    with torch.no_grad():
        states, calls = gptq._layer_inputs(model, layers, chunks, "cpu")
        truth = [model(input_ids=torch.tensor([chunk]), output_hidden_states=True).hidden_states for chunk in chunks]
        inputs: list[torch.Tensor] = []
        hook = layers[1].mlp.up_proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk]))
        hook.remove()
        for index, layer in enumerate(layers):
            for state, hidden in zip(states, truth):
                assert torch.equal(state, hidden[index]), f"layer {index}"
            layer_calls = [call[index] for call in calls]
            if index == 1:
                plain = torch.cat(inputs)
                with gptq._FinalOutputs([[layer.mlp.up_proj]], states) as replay:
                    hessian = gptq._hessian(layer, layer.mlp.up_proj, states, layer_calls, replay)
                assert plain.shape[0] == sum(map(len, chunks))
                torch.testing.assert_close(hessian, plain.T @ plain / plain.shape[0], rtol=1e-5, atol=1e-6)
            states = [gptq._run(layer, state, call) for state, call in zip(states, layer_calls)]


def test_replaying_quantized_linears_gives_the_same_weights_as_recomputing_them(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pocketlm.converters import gptq_walk as gptq

    text, _ = calibration_of_several_chunks(tiny_llama)
    settings = GPTQSettings(bits=4, group_size=32)
    replayed = gptq.quantize_model(tiny_llama, text, settings, ConvertOptions(settings=settings), ignore_progress)
    monkeypatch.setattr(gptq, "_REPLAY_BYTES", 0)  # every pass recomputes every linear
    recomputed = gptq.quantize_model(tiny_llama, text, settings, ConvertOptions(settings=settings), ignore_progress)
    assert replayed.keys() == recomputed.keys() and len(replayed) == 2 * len(LINEARS)
    for name in replayed:
        assert (replayed[name].dequantized == recomputed[name].dequantized).all(), name


def test_a_group_size_that_does_not_divide_a_layer_is_refused_with_one_that_does(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as refused:
        quantize(tiny_llama, tmp_path / "out", group_size=128)  # the attention projections have 64 inputs
    assert "Group size 128 does not divide the 64 inputs" in refused.value.message
    assert "Use group size 64" in refused.value.hint
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("settings", "words"), [({"bits": 3}, "3-bit"), ({"bits": 5}, "5 bits"), ({"group_size": 48}, "group size"),
                                                 ({"damp_percent": 0.0}, "damping")])  # fmt: skip
def test_settings_it_cannot_write_are_refused_with_a_sentence(tiny_llama: Path, tmp_path: Path, settings: dict, words: str) -> None:
    with pytest.raises(ConversionError, match=words):
        quantize(tiny_llama, tmp_path / "out", **settings)


def test_a_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02not loaded")
    with pytest.raises(ConversionError, match="pickle"):
        quantize(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_already_quantized_checkpoint_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    first = quantize(tiny_llama, tmp_path / "once", group_size=32)
    with pytest.raises(ConversionError, match="GPTQ starts from a float checkpoint"):
        quantize(first, tmp_path / "twice", group_size=32)


def test_cancel_during_quantization_leaves_no_folder_and_keeps_an_earlier_output(tiny_llama: Path, tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "earlier.txt").write_text("an earlier conversion")
    cancel = threading.Event()
    options = ConvertOptions(settings=GPTQSettings(group_size=32), cancel=cancel)
    with pytest.raises(Cancelled):
        GPTQConverter().convert(tiny_llama, destination, options, lambda update: cancel.set())  # cancelled after layer 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial folder beside it
    assert [p.name for p in destination.iterdir()] == ["earlier.txt"]


def test_a_calibration_file_that_cannot_be_read_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="calibration text"):
        quantize(tiny_llama, tmp_path / "out", group_size=32, calibration=str(tmp_path / "missing.txt"))


def test_the_converter_describes_itself_without_importing_torch() -> None:
    assert GPTQConverter.output_label(GPTQSettings(bits=4, group_size=128)) == "GPTQ-4bit-g128"
    assert GPTQConverter.is_available()
    # 135M weights at 4 bits: the real folder is 115 MB; the estimate may overshoot (a disk check) but not undershoot.
    assert 115e6 < GPTQConverter.expected_size(134_515_008, GPTQSettings()) < 200e6


# --- the real model (slow) ------------------------------------------------------------------------------------------



def perplexity(model, tokenizer, text: str) -> float:  # type: ignore[no-untyped-def]
    import torch

    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_real_model_gptq_loads_through_transformers_and_beats_round_to_nearest(starter_checkpoint: Path, gptq_checkpoint: Path) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel stops at start-up on a 2-core machine without it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pocketlm.converters.gptq_solver import round_to_nearest

    tokenizer = AutoTokenizer.from_pretrained(gptq_checkpoint)
    # transformers' own GPTQ path (optimum + gptqmodel's kernels), not pocketlm's backend.
    quantized = AutoModelForCausalLM.from_pretrained(gptq_checkpoint, dtype=torch.float32, device_map="cpu")
    assert any(hasattr(m, "qweight") for m in quantized.modules())  # gptqmodel's kernels replaced the linears
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = quantized.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    float_model = AutoModelForCausalLM.from_pretrained(starter_checkpoint, dtype=torch.float32)
    float_ppl = perplexity(float_model, tokenizer, HELD_OUT_TEXT)
    gptq_ppl = perplexity(quantized, tokenizer, HELD_OUT_TEXT)
    with torch.no_grad():  # round-to-nearest on the same grid, in memory: the baseline GPTQ must beat
        for layer in float_model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(round_to_nearest(module.weight, 4, 64).dequantized)
    rtn_ppl = perplexity(float_model, tokenizer, HELD_OUT_TEXT)
    # Measured here (built-in calibration, 495 tokens, damping 0.05): float 27.5, GPTQ 35.6, round-to-nearest 41.1
    # (GPTQModel 7.6 on the same text: 38.5). 4-bit g64 costs a 135M model real quality (the reference:
    # 20.3 → 24.7 with GPTQModel, 27.8 round-to-nearest), and one short calibration chunk leaves GPTQ little to fit,
    # so the bound is 40% over float; GPTQ must beat round-to-nearest by 8% (it does by 13%; GPTQModel by 6%).
    assert gptq_ppl < 1.4 * float_ppl, f"GPTQ {gptq_ppl:.2f} vs float {float_ppl:.2f}"
    assert gptq_ppl < 0.92 * rtn_ppl, f"GPTQ {gptq_ppl:.2f} vs round-to-nearest {rtn_ppl:.2f}"


def test_interrupted_real_model_gptq_leaves_no_folder(starter_checkpoint: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    options = ConvertOptions(settings=GPTQSettings(bits=4, group_size=64), cancel=cancel)

    def stop_after_three_layers(update: ProgressUpdate) -> None:
        if update.completed >= 3:
            cancel.set()

    with pytest.raises(Cancelled):
        GPTQConverter().convert(starter_checkpoint, tmp_path / "gptq", options, stop_after_three_layers)
    assert list(tmp_path.iterdir()) == []
