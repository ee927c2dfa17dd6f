"""compare_models and judge: does a converted model still compute what its reference does?"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pocketlm.backends.base import ChatModel, LoadOptions
from pocketlm.backends.llamacpp import LlamaCppBackend
from pocketlm.backends.model_comparison import Comparison, Scoring, compare, compare_logits, compare_models, describe, first_difference, judge, score
from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.calibration import HELD_OUT_TEXT
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.models.errors import Cancelled, PocketError
from pocketlm.models.progress import ignore_progress


def figures(**changes: object) -> Comparison:
    """A comparison as measured between the starter checkpoint and its Q4_K_M (held-out text), with `changes`."""
    measured = {"scored_tokens": 432, "tokens_identical": True, "first_difference": "", "top1_agreement": 0.863, "mean_kld": 0.049,
                "max_kld": 0.28, "reference_perplexity": 27.48, "model_perplexity": 28.65}  # fmt: skip
    return Comparison(**{**measured, **changes})  # type: ignore[arg-type]


# --- the arithmetic, on logits written by hand ---


def test_kl_divergence_top1_and_perplexities_match_a_hand_computation() -> None:
    reference = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=np.float32))
    model = np.log(np.array([[0.25, 0.5, 0.25], [0.2, 0.6, 0.2]], dtype=np.float32))
    comparison = compare_logits(np.vstack([reference, reference[:1]]), np.vstack([model, model[:1]]), [0, 1, 2, 0])
    kld_first = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    kld_second = 0.1 * math.log(0.1 / 0.2) + 0.8 * math.log(0.8 / 0.6) + 0.1 * math.log(0.1 / 0.2)
    kld_third = kld_first
    assert comparison.scored_tokens == 3
    assert comparison.mean_kld == pytest.approx((kld_first + kld_second + kld_third) / 3, rel=1e-6)  # float32 inputs
    assert comparison.max_kld == pytest.approx(max(kld_first, kld_second), rel=1e-6)
    assert comparison.top1_agreement == pytest.approx(1 / 3)  # rows 0 and 2 favour token 0 vs 1; row 1 agrees on 1
    # Targets 1, 2, 0 are scored at rows 0, 1, 2.
    assert comparison.reference_perplexity == pytest.approx(math.exp(-(math.log(0.25) + math.log(0.1) + math.log(0.5)) / 3), rel=1e-6)
    assert comparison.model_perplexity == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.2) + math.log(0.25)) / 3), rel=1e-6)
    assert comparison.tokens_identical and comparison.first_difference == ""


def test_a_padded_vocabulary_does_not_count_in_the_divergence_but_each_perplexity_is_the_models_own() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(6, 10)).astype(np.float32)
    # The same model with 6 padding rows in its output layer, whose logits are large: compared over the common 10.
    padded = np.hstack([reference, np.full((6, 6), 30.0, dtype=np.float32)])
    comparison = compare_logits(reference, padded, [0, 1, 2, 3, 4, 5])
    assert comparison.mean_kld < 1e-9 and comparison.top1_agreement == 1.0  # the same rows renormalised: rounding only
    # Perplexity over the full vocabulary, as `pocketlm bench --ppl` measures it: the padding takes probability.
    assert comparison.reference_perplexity == pytest.approx(
        math.exp(-np.mean([reference[i, t] - np.log(np.exp(reference[i].astype(np.float64)).sum()) for i, t in enumerate([1, 2, 3, 4, 5])])), rel=1e-6)
    assert comparison.model_perplexity > comparison.reference_perplexity


def test_a_target_outside_the_models_vocabulary_makes_its_perplexity_infinite() -> None:
    reference = np.zeros((3, 8), dtype=np.float32)
    comparison = compare_logits(reference, np.zeros((3, 5), dtype=np.float32), [0, 6, 1])
    assert math.isinf(comparison.model_perplexity) and math.isinf(comparison.perplexity_change)
    assert math.isfinite(comparison.reference_perplexity)


def test_nan_logits_make_a_broken_verdict() -> None:
    reference = np.zeros((3, 5), dtype=np.float32)
    model = np.full((3, 5), np.nan, dtype=np.float32)
    comparison = compare_logits(reference, model, [0, 1, 2])
    assert math.isinf(comparison.perplexity_change)  # NaN perplexities make an infinite change, never a NaN one
    assert math.isinf(comparison.mean_kld)  # a NaN distribution is infinitely far from the reference's (SQLite keeps no NaN)
    assert judge(comparison, quantized=True).level == "broken"


def test_the_first_difference_is_said_in_one_sentence() -> None:
    assert first_difference("the text", [1, 2, 3], [1, 2, 3]) == ""
    assert first_difference("the text", [1, 2, 3], [1, 5, 3]) == "Token 1 of the text is 2 for the reference but 5 for the model."
    assert first_difference("the chat prompt", [1, 2, 3], [1, 2]) == (
        "The reference tokenizes the chat prompt into 3 tokens and the model into 2, the first 2 identical.")


# --- the verdict, on the figures measured on the starter model (backends/model_comparison.py's table) ---


@pytest.mark.parametrize(
    ("measured", "quantized", "level"),
    [
        ({"mean_kld": 3.7e-6, "top1_agreement": 0.996, "model_perplexity": 27.49}, False, "faithful"),  # f16
        ({"mean_kld": 4.9e-5, "top1_agreement": 0.993, "model_perplexity": 27.50}, False, "faithful"),  # bf16
        ({"mean_kld": 0.0043, "top1_agreement": 0.960, "model_perplexity": 27.57}, True, "lossy"),  # Q8_0
        ({}, True, "lossy"),  # Q4_K_M
        ({"mean_kld": 0.47, "top1_agreement": 0.640, "model_perplexity": 35.49}, True, "lossy"),  # Q2_K
        ({"mean_kld": 10.5, "top1_agreement": 0.0, "model_perplexity": 5e5}, False, "broken"),  # q_proj and o_proj swapped
        # down_proj of layers 3 and 20 swapped in an f16: as far off as a Q2_K, which a float result must never be.
        ({"mean_kld": 0.58, "top1_agreement": 0.595, "model_perplexity": 50.0}, False, "broken"),
        ({"mean_kld": 0.0043, "top1_agreement": 0.960, "model_perplexity": 27.57}, False, "broken"),  # a float result as far off as Q8_0
        ({"mean_kld": 3.7e-6, "tokens_identical": False, "first_difference": "Token 3 of the text is 9 for the reference but 8 for the model."}, False, "broken"),
        ({"mean_kld": 1.5, "top1_agreement": 0.1}, True, "broken"),  # it almost never picks the reference's token
        # A random test model's near-uniform reference: 3-bit rounding flips most argmaxes at a Q2_K-like KLD (measured).
        ({"mean_kld": 0.47, "top1_agreement": 0.184}, True, "lossy"),
        ({"model_perplexity": math.inf}, True, "broken"),
    ],
    ids=["f16", "bf16", "Q8_0", "Q4_K_M", "Q2_K", "swapped-tensors", "float-down-proj-swap", "float-as-far-as-Q8_0", "other-tokenizer",
         "top1-10%", "hesitant-reference", "infinite-perplexity"],  # fmt: skip
)
def test_judge_places_the_measured_conversions(measured: dict[str, object], quantized: bool, level: str) -> None:
    verdict = judge(figures(**measured), quantized=quantized)
    assert verdict.level == level
    assert (verdict.advice != "") == (level == "broken")  # a quantization's usual loss is what the user asked for: no advice


def test_the_advice_names_the_tokenizer_or_the_chat_template_by_what_tokenized_differently() -> None:
    probe = "Token 12 of the tokenizer probe is 9 for the reference but 8 for the model."
    tokenizer = judge(figures(tokens_identical=False, first_difference=probe, differs_in="the tokenizer probe"), quantized=True)
    assert tokenizer.advice.startswith(probe) and "tokenizer files" in tokenizer.advice
    chat = "The reference tokenizes the chat prompt into 40 tokens and the model into 38, the first 30 identical."
    template = judge(figures(tokens_identical=False, first_difference=chat, differs_in="the chat prompt"), quantized=True)
    assert template.level == "broken" and template.advice.startswith(chat) and "chat template" in template.advice
    assert "tokenizer files" not in template.advice


def test_the_summary_reads_like_the_models_screen_shows_it() -> None:
    assert describe(figures()) == "tokens identical, top-1 86.3%, KLD 0.049, PPL +4.3%"
    assert describe(figures(mean_kld=3.3e-6, top1_agreement=0.9977, model_perplexity=27.4877)) == "tokens identical, top-1 99.8%, KLD 3.3e-06, PPL +0.0%"
    assert describe(figures(tokens_identical=False, model_perplexity=math.inf)).startswith("tokens differ, ")


# --- real models ---


@pytest.fixture(scope="module")
def tiny_gguf_model(tiny_llama_f32_gguf: Path) -> Iterator[ChatModel]:
    model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=256))
    yield model
    model.close()


def test_a_model_against_itself_is_faithful_with_no_divergence(tiny_gguf_model: ChatModel) -> None:
    steps: list[tuple[int, int]] = []
    comparison = compare_models(tiny_gguf_model, tiny_gguf_model, HELD_OUT_TEXT, max_tokens=128, on_step=lambda *step: steps.append(step))
    # The same engine scores the same ids twice: the logits may differ only by rounding (llama.cpp's batched kernels
    # need not be bit-identical from one call to the next), far below any threshold.
    assert comparison.mean_kld < 1e-9 and comparison.max_kld < 1e-9
    assert comparison.top1_agreement == 1.0 and comparison.tokens_identical
    assert comparison.scored_tokens == 127
    assert abs(comparison.perplexity_change) < 1e-9
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert judge(comparison, quantized=False).level == "faithful"


def test_the_same_weights_on_two_engines_are_faithful(tiny_llama: Path, tiny_gguf_model: ChatModel) -> None:
    from pocketlm.backends.pytorch import TorchBackend

    checkpoint = TorchBackend().load(tiny_llama, LoadOptions(context_length=256))
    try:
        comparison = compare_models(checkpoint, tiny_gguf_model, HELD_OUT_TEXT, max_tokens=200)
    finally:
        checkpoint.close()
    assert comparison.tokens_identical, comparison.first_difference
    assert judge(comparison, quantized=False).level == "faithful"


def test_a_text_of_fewer_than_two_tokens_is_refused(tiny_gguf_model: ChatModel) -> None:
    with pytest.raises(PocketError, match="at least two"):
        compare_models(tiny_gguf_model, tiny_gguf_model, "")


def test_cancelling_stops_the_comparison(tiny_gguf_model: ChatModel) -> None:
    import threading

    cancel = threading.Event()
    with pytest.raises(Cancelled):
        compare_models(tiny_gguf_model, tiny_gguf_model, HELD_OUT_TEXT, cancel=cancel, on_step=lambda done, total: cancel.set())


@pytest.fixture(scope="module")
def starter_on_torch(starter_checkpoint: Path) -> Iterator[ChatModel]:
    from pocketlm.backends.pytorch import TorchBackend

    model = TorchBackend().load(starter_checkpoint, LoadOptions(context_length=1024))
    yield model
    model.close()


def compared_with_gguf(reference: ChatModel, gguf: Path, text: str = HELD_OUT_TEXT) -> Comparison:
    model = LlamaCppBackend().load(gguf, LoadOptions(context_length=1024))
    try:
        return compare_models(reference, model, text)
    finally:
        model.close()


def test_the_f16_conversion_of_the_starter_checkpoint_is_faithful(starter_on_torch: ChatModel, converted_f16: Path) -> None:
    comparison = compared_with_gguf(starter_on_torch, converted_f16)
    assert comparison.tokens_identical, comparison.first_difference
    assert judge(comparison, quantized=False).level == "faithful", describe(comparison)


@pytest.mark.parametrize("quantized", ["quantized_q4_k_m", "quantized_q2_k"])
def test_quantizations_down_to_q2_k_are_lossy_not_broken(starter_on_torch: ChatModel, quantized: str, request: pytest.FixtureRequest) -> None:
    comparison = compared_with_gguf(starter_on_torch, request.getfixturevalue(quantized))
    verdict = judge(comparison, quantized=True)
    assert verdict.level == "lossy", verdict.summary
    assert comparison.model_perplexity > comparison.reference_perplexity


@pytest.fixture(scope="module")
def swapped_attention_gguf(starter_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The starter checkpoint with every layer's q_proj and o_proj weights swapped (same shape: the conversion cannot
    notice), converted to f16 GGUF: a converter bug that puts a tensor under the wrong name."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("swapped") / "SmolLM2-swapped-hf"
    shutil.copytree(starter_checkpoint, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(starter_checkpoint / "model.safetensors")
    for name in [name for name in tensors if name.endswith("self_attn.q_proj.weight")]:
        output = name.replace("q_proj", "o_proj")
        tensors[name], tensors[output] = tensors[output], tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    destination = folder.with_name("SmolLM2-swapped-F16.gguf")
    return HfToGGUF().convert(folder, destination, ConvertOptions(settings=GGUFSettings(outtype="f16")), ignore_progress).path


def test_swapped_tensors_are_broken(starter_on_torch: ChatModel, swapped_attention_gguf: Path) -> None:
    comparison = compared_with_gguf(starter_on_torch, swapped_attention_gguf)
    assert comparison.tokens_identical  # the tokenizer came through: only the weights are wrong
    verdict = judge(comparison, quantized=False)
    assert verdict.level == "broken", verdict.summary
    assert verdict.advice


def test_a_wrong_pre_tokenizer_is_broken_and_says_where_the_tokens_part(starter_checkpoint: Path, starter_on_torch: ChatModel, tmp_path: Path) -> None:
    """The starter's weights with a pre-tokenizer that puts a space before the text (add_prefix_space, as a converter
    that took it for a SentencePiece model would): "The" at the start becomes " The"."""
    from pocketlm.backends.pytorch import TorchBackend

    folder = tmp_path / "SmolLM2-prefix-space"
    shutil.copytree(starter_checkpoint, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(starter_checkpoint / "model.safetensors")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for step in tokenizer["pre_tokenizer"]["pretokenizers"]:
        if step["type"] == "ByteLevel":
            step["add_prefix_space"] = True
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    model = TorchBackend().load(folder, LoadOptions(context_length=1024))
    try:
        comparison = compare_models(starter_on_torch, model, HELD_OUT_TEXT)
    finally:
        model.close()
    assert not comparison.tokens_identical
    assert comparison.first_difference.startswith("Token ") and "of the text" in comparison.first_difference
    # Both scored the reference's ids with the same weights on the same engine: rounding at most.
    assert comparison.mean_kld < 1e-9
    verdict = judge(comparison, quantized=False)
    assert verdict.level == "broken" and "tokens differ" in verdict.summary


def test_a_scoring_outlives_its_model_so_one_model_is_loaded_at_a_time(tiny_llama_f32_gguf: Path) -> None:
    def scored(ids: tuple[int, ...] | None) -> Scoring:
        model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=256))
        try:
            return score(model, HELD_OUT_TEXT, ids, max_tokens=100)
        finally:
            model.close()

    reference = scored(None)
    comparison = compare(reference, scored(reference.ids))
    assert comparison.scored_tokens == 99 and comparison.tokens_identical
    assert judge(comparison, quantized=False).level == "faithful"
