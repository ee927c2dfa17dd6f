"""LoRA adapters on a live llama.cpp model: what it computes equals transformers + PEFT, and attaching, rescaling and
detaching happen on the loaded model, with the next reply computed with the new set.

Tolerance of the parity tests: the tiny model and its adapters are float32 everywhere, but llama.cpp keeps the
attention's keys and values in f16 (its default cache type), so even the bare base model differs from transformers
by about 0.01 on logits of magnitude about 5 (measured: 0.011; with the adapters 0.011–0.015). 0.05 leaves room for
another summation order and still catches any real mistake: the adapters move logits by 0.6–2.8, a dropped rsLoRA √r
or an unfolded alpha pattern by well over 0.3, a q/k permutation left out by about as much as the adapter itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pocketlm.backends.base import AdapterSpec, ChatMessage, LoadOptions, SamplingParams, TextPiece
from pocketlm.backends.llamacpp import LlamaCppBackend, LlamaCppChatModel
from pocketlm.converters.adapter_settings import AdapterConversionSettings
from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.converters.lora_gguf import PeftToGGUFLora
from pocketlm.models.errors import PocketError
from pocketlm.models.peft_adapter import AdapterError
from pocketlm.models.progress import ignore_progress
from tests.adapter_fixtures import build_peft_adapter

TOKENS = list(range(1, 41))
TOLERANCE = 0.05  # see the module docstring


def convert_adapter(peft_folder: Path, base: Path, destination: Path, outtype: str = "f32") -> Path:
    options = ConvertOptions(settings=AdapterConversionSettings(base=base, outtype=outtype))
    return PeftToGGUFLora().convert(peft_folder, destination, options, ignore_progress).path


def peft_logits(base: Path, adapters: Sequence[tuple[Path, float]], tokens: Sequence[int] = TOKENS) -> np.ndarray:
    """transformers + PEFT's logits with `adapters` active at their scales (none: the base model)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapters:
        names = [f"a{i}" for i in range(len(adapters))]
        model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0])
        for name, (folder, _) in zip(names[1:], adapters[1:]):
            model.load_adapter(folder, adapter_name=name)
        model.base_model.set_adapter(names)
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for name, (_, scale) in zip(names, adapters):
                    layer.set_scale(name, scale)
    with torch.no_grad():
        return model.eval()(torch.tensor([list(tokens)])).logits[0].numpy()


@pytest.fixture(scope="module")
def gguf_adapters(tiny_adapters: dict[str, Path], tiny_llama_f32_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny adapter converted by our converter for the f32 GGUF, in f32 (so only llama.cpp's arithmetic differs)."""
    folder = tmp_path_factory.mktemp("gguf-adapters")
    return {name: convert_adapter(peft, tiny_llama_f32_gguf, folder / f"{name}.gguf") for name, peft in tiny_adapters.items()}


@pytest.fixture
def tiny_model(tiny_llama_f32_gguf: Path) -> LlamaCppChatModel:
    model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=256))
    yield model
    model.close()


def test_the_llama_cpp_backend_takes_gguf_lora_adapters() -> None:
    assert LlamaCppBackend.adapter_formats == frozenset({"gguf-lora"})


@pytest.mark.parametrize("name", ["plain", "rslora", "patterned"])
def test_logits_with_a_converted_adapter_equal_peft(name: str, tiny_model: LlamaCppChatModel, tiny_llama: Path,
                                                    tiny_adapters: dict[str, Path], gguf_adapters: dict[str, Path]) -> None:  # fmt: skip
    expected = peft_logits(tiny_llama, [(tiny_adapters[name], 1.0)])
    assert np.abs(expected - peft_logits(tiny_llama, [])).max() > 0.5  # the adapter changes something worth checking
    tiny_model.set_adapters([AdapterSpec(gguf_adapters[name])])
    assert np.abs(tiny_model.token_logits(TOKENS) - expected).max() < TOLERANCE


def test_an_adapter_at_scale_zero_equals_the_base_model(tiny_model: LlamaCppChatModel, gguf_adapters: dict[str, Path]) -> None:
    base = tiny_model.token_logits(TOKENS)
    tiny_model.set_adapters([AdapterSpec(gguf_adapters["plain"], scale=0.0)])
    # The same engine computing the same graph (llama.cpp leaves zero-scale adapters out): no tolerance beyond rounding.
    np.testing.assert_allclose(tiny_model.token_logits(TOKENS), base, atol=1e-5)


def test_an_adapter_at_half_scale_equals_peft_set_scale_half(tiny_model: LlamaCppChatModel, tiny_llama: Path,
                                                             tiny_adapters: dict[str, Path], gguf_adapters: dict[str, Path]) -> None:  # fmt: skip
    tiny_model.set_adapters([AdapterSpec(gguf_adapters["rslora"], scale=0.5)])
    expected = peft_logits(tiny_llama, [(tiny_adapters["rslora"], 0.5)])
    assert np.abs(tiny_model.token_logits(TOKENS) - expected).max() < TOLERANCE
    assert np.abs(expected - peft_logits(tiny_llama, [(tiny_adapters["rslora"], 1.0)])).max() > 0.3  # half is not whole


def test_two_stacked_adapters_equal_peft_with_both_active(tiny_model: LlamaCppChatModel, tiny_llama: Path,
                                                          tiny_adapters: dict[str, Path], gguf_adapters: dict[str, Path]) -> None:  # fmt: skip
    tiny_model.set_adapters([AdapterSpec(gguf_adapters["plain"]), AdapterSpec(gguf_adapters["second"], scale=0.7)])
    expected = peft_logits(tiny_llama, [(tiny_adapters["plain"], 1.0), (tiny_adapters["second"], 0.7)])
    assert np.abs(tiny_model.token_logits(TOKENS) - expected).max() < TOLERANCE
    assert np.abs(expected - peft_logits(tiny_llama, [(tiny_adapters["plain"], 1.0)])).max() > 0.3  # the second one counts


def test_attach_rescale_and_detach_on_the_live_model(tiny_model: LlamaCppChatModel, tiny_llama: Path,
                                                     tiny_adapters: dict[str, Path], gguf_adapters: dict[str, Path]) -> None:  # fmt: skip
    model_before = tiny_model
    base = tiny_model.token_logits(TOKENS)
    attached = AdapterSpec(gguf_adapters["plain"], name="plain")
    tiny_model.set_adapters([attached])
    assert tiny_model.description.adapters == (attached,)
    assert np.abs(tiny_model.token_logits(TOKENS) - peft_logits(tiny_llama, [(tiny_adapters["plain"], 1.0)])).max() < TOLERANCE
    rescaled = AdapterSpec(gguf_adapters["plain"], scale=0.25, name="plain")
    tiny_model.set_adapters([rescaled])
    assert tiny_model.description.adapters == (rescaled,)
    assert np.abs(tiny_model.token_logits(TOKENS) - peft_logits(tiny_llama, [(tiny_adapters["plain"], 0.25)])).max() < TOLERANCE
    tiny_model.set_adapters([])
    assert tiny_model.description.adapters == ()
    np.testing.assert_allclose(tiny_model.token_logits(TOKENS), base, atol=1e-5)
    assert tiny_model is model_before


def greedy_reply(model: LlamaCppChatModel, messages: list[ChatMessage]) -> str:
    events = model.stream_chat(messages, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    return "".join(event.text for event in events if isinstance(event, TextPiece))


def test_the_reply_after_a_switch_is_computed_with_the_new_adapters(tiny_llama_f32_gguf: Path, gguf_adapters: dict[str, Path]) -> None:
    """The decode loop reuses the cached prefix of the conversation; a prefix cached with an adapter must not be
    reused once it is detached. Greedy decoding is deterministic for one engine on one machine, so the reply after
    detaching must be the fresh base model's, token for token."""
    messages = [ChatMessage("user", "The quick brown fox jumps over the lazy dog.")]
    with_adapter = AdapterSpec(gguf_adapters["plain"], scale=4.0)  # strong: a stale prefix would change the reply
    fresh = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=256))
    try:
        base_reply = greedy_reply(fresh, messages)
    finally:
        fresh.close()
    model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=256, adapters=(with_adapter,)))
    try:
        adapted_reply = greedy_reply(model, messages)  # leaves the prompt and reply cached, computed with the adapter
        assert adapted_reply != base_reply
        model.set_adapters([])
        assert greedy_reply(model, messages) == base_reply
        model.set_adapters([with_adapter])
        assert greedy_reply(model, messages) == adapted_reply
    finally:
        model.close()


def test_load_options_adapters_are_applied_at_load(tiny_llama_f32_gguf: Path, tiny_llama: Path,
                                                   tiny_adapters: dict[str, Path], gguf_adapters: dict[str, Path]) -> None:  # fmt: skip
    spec = AdapterSpec(gguf_adapters["second"], scale=1.5)
    model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=256, adapters=(spec,)))
    try:
        assert model.description.adapters == (spec,)
        assert np.abs(model.token_logits(TOKENS) - peft_logits(tiny_llama, [(tiny_adapters["second"], 1.5)])).max() < TOLERANCE
    finally:
        model.close()


def tiny_llama_of_another_size(destination: Path, tokenizer_from: Path) -> Path:
    """A random Llama like tiny_llama but 32 wide: same architecture, other shapes."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.converters.tiny_models import SMALL

    config = LlamaConfig(**{**SMALL, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 600, "tie_word_embeddings": False})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(destination)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def foreign_adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GGUF LoRAs made for other models, each converted correctly for its own base."""
    from tests.converters.tiny_models import build_tiny_model

    folder = tmp_path_factory.mktemp("foreign")
    narrow = tiny_llama_of_another_size(folder / "narrow-llama", tiny_llama)
    qwen = build_tiny_model("qwen2", folder / "qwen2", tiny_llama, vocab_size=600)
    adapters = {}
    for name, base in (("narrow", narrow), ("qwen2", qwen)):
        peft = build_peft_adapter(base, folder / f"{name}-peft", targets=("q_proj", "v_proj"))
        adapters[name] = convert_adapter(peft, base, folder / f"{name}.gguf")
    return adapters


def test_an_adapter_for_another_architecture_is_refused_with_a_sentence(tiny_model: LlamaCppChatModel, foreign_adapters: dict[str, Path]) -> None:
    with pytest.raises(AdapterError, match=r"adapter for a 'qwen2' model; .* is 'llama'"):
        tiny_model.set_adapters([AdapterSpec(foreign_adapters["qwen2"])])


def test_an_adapter_for_another_size_is_refused_and_the_active_set_is_kept(tiny_model: LlamaCppChatModel, gguf_adapters: dict[str, Path],
                                                                          foreign_adapters: dict[str, Path]) -> None:  # fmt: skip
    kept = AdapterSpec(gguf_adapters["plain"])
    tiny_model.set_adapters([kept])
    before = tiny_model.token_logits(TOKENS)
    with pytest.raises(AdapterError, match="tensors do not match this model's") as refusal:
        tiny_model.set_adapters([kept, AdapterSpec(foreign_adapters["narrow"], name="narrow")])
    assert "narrow" in refusal.value.message and refusal.value.hint
    assert tiny_model.description.adapters == (kept,)
    np.testing.assert_allclose(tiny_model.token_logits(TOKENS), before, atol=1e-5)


def test_a_damaged_adapter_file_is_refused_with_a_sentence(tiny_model: LlamaCppChatModel, gguf_adapters: dict[str, Path], tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.gguf"
    data = gguf_adapters["plain"].read_bytes()
    damaged.write_bytes(data[: len(data) // 3])
    with pytest.raises(AdapterError, match="cannot be used as a GGUF LoRA adapter: .*truncated"):
        tiny_model.set_adapters([AdapterSpec(damaged)])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(AdapterError, match="not a GGUF file"):
        tiny_model.set_adapters([AdapterSpec(garbage)])


def test_a_model_or_a_peft_folder_is_not_taken_as_an_adapter(tiny_model: LlamaCppChatModel, tiny_llama_f32_gguf: Path,
                                                             tiny_adapters: dict[str, Path]) -> None:  # fmt: skip
    with pytest.raises(AdapterError, match="is a GGUF model, not a LoRA adapter"):
        tiny_model.set_adapters([AdapterSpec(tiny_llama_f32_gguf)])
    sentence = r"^plain is a PEFT LoRA adapter \(peft-lora\); the llama.cpp backend takes GGUF LoRA adapters \(gguf-lora\)\."
    with pytest.raises(AdapterError, match=sentence):
        tiny_model.set_adapters([AdapterSpec(tiny_adapters["plain"])])


def test_the_same_adapter_listed_twice_is_refused_not_summed(tiny_model: LlamaCppChatModel, gguf_adapters: dict[str, Path]) -> None:
    tiny_model.set_adapters([AdapterSpec(gguf_adapters["second"])])
    with pytest.raises(AdapterError, match="^plain is listed twice"):
        tiny_model.set_adapters([AdapterSpec(gguf_adapters["plain"]), AdapterSpec(gguf_adapters["plain"], scale=0.5)])
    assert tiny_model.description.adapters == (AdapterSpec(gguf_adapters["second"]),)


def test_no_tokens_or_more_than_the_context_are_refused_with_a_sentence(tiny_model: LlamaCppChatModel) -> None:
    for tokens in ([], list(range(1, 258))):
        with pytest.raises(PocketError, match=rf"token_logits takes 1 to 256 tokens \(the loaded context\), not {len(tokens)}\."):
            tiny_model.token_logits(tokens)


def test_a_closed_model_refuses_adapters_scoring_and_replies_with_a_sentence(tiny_llama_f32_gguf: Path, gguf_adapters: dict[str, Path]) -> None:
    # Reaching llama.cpp here would read freed memory (the app's adapter panel can race a model switch).
    model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=64))
    model.close()
    model.close()  # a second close is harmless
    name = model.description.name
    with pytest.raises(PocketError, match=f"^{name} was closed, so it cannot be used any more"):
        list(model.stream_chat([ChatMessage("user", "hi")], SamplingParams(temperature=0, max_tokens=2)))
    with pytest.raises(PocketError, match=f"^{name} was closed, so it cannot be used any more"):
        model.set_adapters([AdapterSpec(gguf_adapters["plain"])])
    with pytest.raises(PocketError, match=f"^{name} was closed, so it cannot be used any more"):
        model.token_logits(TOKENS)


def test_token_logits_leave_no_prefix_a_reply_reuses(tiny_model: LlamaCppChatModel) -> None:
    first = tiny_model.token_logits(TOKENS)
    assert first.shape == (len(TOKENS), tiny_model._n_vocab) and first.dtype == np.float32
    # Scoring other text in between changes nothing: each call starts from an empty cache.
    tiny_model.token_logits(list(range(300, 340)))
    np.testing.assert_allclose(tiny_model.token_logits(TOKENS), first, atol=1e-5)
    np.testing.assert_allclose(tiny_model.token_logits(TOKENS[:10]), first[:10], atol=1e-4)


# --- the real model ---------------------------------------------------------------------------------------------------


def test_the_real_model_with_an_adapter_follows_peft_greedy_answer(starter_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """SmolLM2-135M in f32 GGUF (converted from the very checkpoint PEFT runs on) with a rank-8 q/v adapter: llama.cpp
    picks PEFT's greedy token at each step of PEFT's answer, except at a near-tie, where f16 keys and values may tip
    it. On this model llama.cpp's logits (up to about 40) differ from PEFT's by a few hundredths (measured 0.03 on this
    answer, 0.11 at most on another prompt), from f16 keys and values and summation order; 0.3 bounds that, while the
    adapter moves them by about 4 here."""
    from tests.adapter_fixtures import peft_greedy_answer
    from tests.fixtures import capital_question

    folder = tmp_path_factory.mktemp("real-adapter")
    settings = GGUFSettings(outtype="f32")
    base_gguf = HfToGGUF().convert(starter_checkpoint, folder / "starter-f32.gguf", ConvertOptions(settings=settings), ignore_progress).path
    peft_folder = build_peft_adapter(starter_checkpoint, folder / "peft", rank=8, alpha=16.0, targets=("q_proj", "v_proj"), spread=0.03)
    adapter = convert_adapter(peft_folder, starter_checkpoint, folder / "adapter.gguf")
    answer = peft_greedy_answer(starter_checkpoint, peft_folder, [{"role": m.role, "content": m.content} for m in capital_question()])

    model = LlamaCppBackend().load(base_gguf, LoadOptions(context_length=512, adapters=(AdapterSpec(adapter),)))
    try:
        got = model.token_logits(answer.tokens)
    finally:
        model.close()
    assert np.abs(answer.logits - answer.base_logits).max() > 1.0
    assert np.abs(got - answer.logits).max() < 0.3
    answer.check_follows(got, "llama.cpp", near_tie=0.3)
