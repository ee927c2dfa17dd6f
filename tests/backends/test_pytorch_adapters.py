"""LoRA adapters on the PyTorch backend, against transformers + PEFT themselves: the tiny random Llama with PEFT's own
saved adapters (seconds), and the real starter checkpoint for a greedy answer (slow).

Tolerances: the backend applies adapters through PEFT's own LoRA layers on a transformers model loaded in float32,
which is the reference's code path operation for operation, so the logits agree to the last bit (measured: a
difference of exactly 0 in every check here). The tests allow 1e-5, about 1e-6 of the tiny model's O(1-10) logits:
room for a float32 summation order torch might pick differently between two models, and ten thousand times less
than an adapter moves them (more than 0.1 here; each test checks that too, so none passes vacuously).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pocketlm.backends.base import AdapterSpec, LoadOptions, SamplingParams
from pocketlm.backends.pytorch import TorchBackend, TorchChatModel
from pocketlm.models.errors import PocketError
from pocketlm.models.peft_adapter import AdapterError
from tests.adapter_fixtures import build_peft_adapter
from tests.backends.chat_model_contract import HELLO, fixed_length, reply

TOKENS = list(range(1, 41))  # ids 1..40 of the tiny model's 600: its SentencePiece pieces, no special meaning
SAME = 1e-5  # see the module's docstring
VISIBLE = 0.1  # an adapter (or a scale) that changes nothing would make a parity test pass vacuously


def peft_reference(base: Path, adapters: dict[str, Path], active: list[str], scales: dict[str, float] | None = None) -> np.ndarray:
    """transformers + PEFT on their own: the logits after TOKENS with `active` adapters, each at its scale."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    peft_model.base_model.set_adapter(active)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, scale in (scales or {}).items():
                module.set_scale(name, scale)
    with torch.inference_mode():
        return peft_model(input_ids=torch.tensor([TOKENS])).logits[0].float().numpy()


def transformers_base(base: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([TOKENS])).logits[0].float().numpy()


def largest_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape == (len(TOKENS), 600)
    assert ours.dtype == np.float32
    return float(np.abs(ours - theirs).max())


@pytest.fixture(scope="module")
def base_logits(tiny_llama: Path) -> np.ndarray:
    return transformers_base(tiny_llama)


@pytest.fixture
def live_model(tiny_llama: Path) -> Iterator[TorchChatModel]:
    model = TorchBackend().load(tiny_llama, LoadOptions(context_length=256))
    yield model
    model.close()


def test_the_torch_backend_takes_peft_lora_folders() -> None:
    assert TorchBackend.adapter_formats == frozenset({"peft-lora"})


@pytest.mark.parametrize("name", ["plain", "rslora", "patterned"])
def test_an_adapter_given_at_load_gives_pefts_logits(name: str, tiny_llama: Path, tiny_adapters: dict[str, Path], base_logits: np.ndarray) -> None:
    model = TorchBackend().load(tiny_llama, LoadOptions(context_length=256, adapters=(AdapterSpec(tiny_adapters[name]),)))
    try:
        ours = model.token_logits(TOKENS)
        assert model.description.adapters == (AdapterSpec(tiny_adapters[name]),)
    finally:
        model.close()
    reference = peft_reference(tiny_llama, {name: tiny_adapters[name]}, [name])
    assert largest_difference(reference, base_logits) > VISIBLE
    assert largest_difference(ours, reference) <= SAME


def test_scale_zero_is_the_base_model(live_model: TorchChatModel, tiny_adapters: dict[str, Path], base_logits: np.ndarray) -> None:
    live_model.set_adapters([AdapterSpec(tiny_adapters["plain"], scale=0.0)])
    assert largest_difference(live_model.token_logits(TOKENS), base_logits) <= SAME


@pytest.mark.parametrize("name", ["rslora", "patterned"])
def test_scale_one_half_is_pefts_set_scale_one_half(name: str, live_model: TorchChatModel, tiny_llama: Path,
                                                    tiny_adapters: dict[str, Path]) -> None:  # fmt: skip
    # The backend sets each layer's scale from its own reading of the adapter (alpha/√r for rsLoRA, pattern entries
    # per module), not from PEFT's set_scale: these two adapters are where the two could differ.
    live_model.set_adapters([AdapterSpec(tiny_adapters[name], scale=0.5)])
    ours = live_model.token_logits(TOKENS)
    reference = peft_reference(tiny_llama, {name: tiny_adapters[name]}, [name], {name: 0.5})
    assert largest_difference(reference, peft_reference(tiny_llama, {name: tiny_adapters[name]}, [name])) > VISIBLE
    assert largest_difference(ours, reference) <= SAME


def test_two_stacked_adapters_are_pefts_two_active_adapters(live_model: TorchChatModel, tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    live_model.set_adapters([AdapterSpec(tiny_adapters["plain"]), AdapterSpec(tiny_adapters["second"], scale=0.5)])
    ours = live_model.token_logits(TOKENS)
    pair = {"plain": tiny_adapters["plain"], "second": tiny_adapters["second"]}
    reference = peft_reference(tiny_llama, pair, ["plain", "second"], {"second": 0.5})
    assert largest_difference(reference, peft_reference(tiny_llama, pair, ["plain"])) > VISIBLE
    assert largest_difference(ours, reference) <= SAME


def test_attach_rescale_and_detach_change_the_same_live_model(live_model: TorchChatModel, tiny_adapters: dict[str, Path], base_logits: np.ndarray) -> None:
    plain = AdapterSpec(tiny_adapters["plain"], name="style")
    live_model.set_adapters([plain])
    attached = live_model.token_logits(TOKENS)
    live_model.set_adapters([AdapterSpec(plain.path, scale=0.25, name="style")])
    rescaled = live_model.token_logits(TOKENS)
    assert live_model.description.adapters == (AdapterSpec(plain.path, scale=0.25, name="style"),)
    live_model.set_adapters([])
    detached = live_model.token_logits(TOKENS)
    assert live_model.description.adapters == ()
    live_model.set_adapters([plain])
    again = live_model.token_logits(TOKENS)
    assert largest_difference(attached, base_logits) > VISIBLE
    assert largest_difference(rescaled, attached) > VISIBLE and largest_difference(rescaled, base_logits) > VISIBLE
    assert largest_difference(detached, base_logits) <= SAME
    assert largest_difference(again, attached) <= SAME


def test_the_reply_after_a_switch_is_made_with_the_new_adapters(live_model: TorchChatModel, tiny_adapters: dict[str, Path]) -> None:
    def greedy() -> str:
        text, stats = reply(list(live_model.stream_chat(HELLO, fixed_length(16))))
        assert stats.generated_tokens == 16
        return text

    base = greedy()
    live_model.set_adapters([AdapterSpec(tiny_adapters["plain"])])
    with_plain = greedy()
    live_model.set_adapters([AdapterSpec(tiny_adapters["plain"]), AdapterSpec(tiny_adapters["second"])])
    with_both = greedy()
    live_model.set_adapters([])
    assert with_plain != base and with_both != with_plain
    assert greedy() == base


def test_an_adapter_attached_before_is_reused_from_memory(live_model: TorchChatModel, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_adapters["plain"], tmp_path / "plain"))
    live_model.set_adapters([AdapterSpec(copy)])
    attached = live_model.token_logits(TOKENS)
    live_model.set_adapters([])
    # Damage the weights but keep their size and time: read again, the adapter would be refused or give other logits.
    weights = copy / "adapter_model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"\0" * stat.st_size)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    live_model.set_adapters([AdapterSpec(copy)])
    assert largest_difference(live_model.token_logits(TOKENS), attached) <= SAME


def test_an_adapter_retrained_in_the_same_folder_is_read_again(live_model: TorchChatModel, tiny_llama: Path, tiny_adapters: dict[str, Path],
                                                                tmp_path: Path) -> None:  # fmt: skip
    folder = Path(shutil.copytree(tiny_adapters["plain"], tmp_path / "style"))
    live_model.set_adapters([AdapterSpec(folder)])
    first = live_model.token_logits(TOKENS)
    shutil.rmtree(folder)
    shutil.copytree(tiny_adapters["second"], folder)  # what a new training run saves over the old one
    live_model.set_adapters([AdapterSpec(folder, scale=0.5)])
    ours = live_model.token_logits(TOKENS)
    reference = peft_reference(tiny_llama, {"second": tiny_adapters["second"]}, ["second"], {"second": 0.5})
    assert largest_difference(ours, first) > VISIBLE
    assert largest_difference(ours, reference) <= SAME


def test_attaching_prints_nothing_in_a_fresh_process(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    # A fresh process: PEFT imports gptqmodel (banner on stdout) and torchao (notes on stderr) the first time only.
    import subprocess
    import sys

    script = (
        "from pathlib import Path\n"
        "from pocketlm.backends.base import AdapterSpec, LoadOptions\n"
        "from pocketlm.backends.pytorch import TorchBackend\n"
        f"adapters = [AdapterSpec(Path(p)) for p in {[str(tiny_adapters[n]) for n in ('patterned', 'second')]!r}]\n"
        f"model = TorchBackend().load(Path({str(tiny_llama)!r}), LoadOptions(context_length=64, adapters=(adapters[0],)))\n"
        "model.set_adapters(adapters)\n"
        "model.set_adapters([AdapterSpec(adapters[1].path, scale=2.0)])\n"
        "model.set_adapters([])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", ""), "PEFT's, gptqmodel's or torchao's notes must not reach the CLI's reply or the app's screen"


def tiny_llama_of(folder: Path, **sizes: int) -> Path:
    """A random Llama of the tiny model's shape with some sizes changed, to train an adapter that does not fit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 600, **sizes}  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def misfit_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.converters.tiny_models import build_tiny_model, train_sentencepiece_tokenizer

    folder = tmp_path_factory.mktemp("misfits")
    qwen3 = build_tiny_model("qwen3", folder / "qwen3", train_sentencepiece_tokenizer(folder / "tokenizer"), vocab_size=600)
    return {
        "other architecture": build_peft_adapter(qwen3, folder / "qwen3-lora"),
        "hidden size": build_peft_adapter(tiny_llama_of(folder / "wide", hidden_size=96), folder / "wide-lora"),
        "layer count": build_peft_adapter(tiny_llama_of(folder / "deep", num_hidden_layers=4), folder / "deep-lora", layers=[3]),
    }


@pytest.mark.parametrize(("kind", "sentence"), [
    # models/adapter_fit.py's sentences: the backend checks an adapter against its base before PEFT loads it.
    ("other architecture", r"qwen3-lora's self_attn\.k_proj gives 64 outputs but llama's gives 32"),
    ("hidden size", r"wide-lora's [\w.]+ (takes 96 inputs but llama's takes|gives 96 outputs but llama's gives) 64"),
    ("layer count", r"deep-lora changes layer 3, but llama has only 2 layers"),
])  # fmt: skip
def test_an_adapter_that_does_not_fit_is_refused_with_a_sentence_and_changes_nothing(
    kind: str, sentence: str, misfit_adapters: dict[str, Path], live_model: TorchChatModel, tiny_adapters: dict[str, Path]
) -> None:
    live_model.set_adapters([AdapterSpec(tiny_adapters["plain"])])
    before = live_model.token_logits(TOKENS)
    with pytest.raises(AdapterError, match=sentence) as refused:
        live_model.set_adapters([AdapterSpec(tiny_adapters["second"]), AdapterSpec(misfit_adapters[kind])])
    assert "trained on llama" in refused.value.hint
    assert "\n" not in refused.value.message
    assert live_model.description.adapters == (AdapterSpec(tiny_adapters["plain"]),)
    assert largest_difference(live_model.token_logits(TOKENS), before) <= SAME


@pytest.mark.parametrize("attached_before", [False, True], ids=["first adapter", "after another"])
def test_an_adapter_peft_itself_refuses_is_a_sentence_and_leaves_nothing_behind(
    attached_before: bool, live_model: TorchChatModel, tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    # Its tensors fit the model, but its config targets a module name the model lacks: PEFT raises while wrapping.
    odd = Path(shutil.copytree(tiny_adapters["second"], tmp_path / "odd"))
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qkv_proj"]}))
    if attached_before:
        live_model.set_adapters([AdapterSpec(tiny_adapters["plain"])])
    with pytest.raises(AdapterError, match=r"^PEFT could not attach odd to llama: .*qkv_proj") as refused:
        live_model.set_adapters([AdapterSpec(odd)])
    assert "\n" not in refused.value.message
    live_model.set_adapters([AdapterSpec(tiny_adapters["second"])])
    reference = peft_reference(tiny_llama, {"second": tiny_adapters["second"]}, ["second"])
    assert largest_difference(live_model.token_logits(TOKENS), reference) <= SAME


def test_a_refusal_on_a_model_without_adapters_leaves_it_the_base_model(
    live_model: TorchChatModel, misfit_adapters: dict[str, Path], tiny_adapters: dict[str, Path], base_logits: np.ndarray
) -> None:
    # PEFT makes the adapter it first wraps a model with active: "plain" is wrapped before the misfit is refused.
    with pytest.raises(AdapterError, match="only 2 layers"):
        live_model.set_adapters([AdapterSpec(tiny_adapters["plain"]), AdapterSpec(misfit_adapters["layer count"])])
    assert live_model.description.adapters == ()
    assert largest_difference(live_model.token_logits(TOKENS), base_logits) <= SAME


def test_an_adapter_refused_at_load_is_a_sentence(tiny_llama: Path, misfit_adapters: dict[str, Path]) -> None:
    with pytest.raises(AdapterError, match="but llama has only 2 layers"):
        TorchBackend().load(tiny_llama, LoadOptions(context_length=64, adapters=(AdapterSpec(misfit_adapters["layer count"]),)))


def test_an_adapter_of_another_format_is_refused_naming_the_format_it_takes(live_model: TorchChatModel, tmp_path: Path) -> None:
    gguf = tmp_path / "style.gguf"
    gguf.write_bytes(b"GGUF")
    mlx = tmp_path / "mlx-style"
    mlx.mkdir()
    (mlx / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    (mlx / "adapters.safetensors").write_bytes(b"")
    for path, kind in ((gguf, "gguf-lora"), (mlx, "mlx-lora")):
        with pytest.raises(AdapterError, match=rf"\({kind}\).*takes PEFT LoRA adapters \(peft-lora\)"):
            live_model.set_adapters([AdapterSpec(path)])


def test_the_same_adapter_twice_is_refused(live_model: TorchChatModel, tiny_adapters: dict[str, Path]) -> None:
    with pytest.raises(AdapterError, match="plain is listed twice"):
        live_model.set_adapters([AdapterSpec(tiny_adapters["plain"]), AdapterSpec(tiny_adapters["plain"], scale=0.5)])


def test_token_logits_leave_nothing_a_reply_reuses(live_model: TorchChatModel) -> None:
    before = reply(list(live_model.stream_chat(HELLO, fixed_length(8))))[0]
    live_model.token_logits(TOKENS)
    assert reply(list(live_model.stream_chat(HELLO, fixed_length(8))))[0] == before


def test_no_tokens_or_more_than_the_context_are_refused_with_a_sentence(live_model: TorchChatModel) -> None:
    for tokens in ([], list(range(1, 258))):
        with pytest.raises(PocketError, match=rf"token_logits takes 1 to 256 tokens \(the loaded context\), not {len(tokens)}\."):
            live_model.token_logits(tokens)


def test_a_closed_model_refuses_adapters_with_a_sentence(tiny_llama: Path, tiny_adapters: dict[str, Path]) -> None:
    model = TorchBackend().load(tiny_llama, LoadOptions(context_length=64))
    model.close()
    with pytest.raises(PocketError, match="^llama was closed, so it cannot be used any more"):
        model.set_adapters([AdapterSpec(tiny_adapters["plain"])])
    with pytest.raises(PocketError, match="^llama was closed, so it cannot be used any more"):
        model.token_logits(TOKENS)


# The real model (slow).


@pytest.fixture(scope="module")
def starter_adapter(starter_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A small spread: the answer moves without turning to noise (SmolLM2's attention inputs are RMS-normed, O(1)).
    return build_peft_adapter(starter_checkpoint, tmp_path_factory.mktemp("starter-lora") / "lora", rank=8, alpha=16.0,
                              targets=("q_proj", "v_proj"), spread=0.02, seed=7)  # fmt: skip


def test_the_starter_model_with_an_adapter_gives_pefts_greedy_answer(starter_checkpoint: Path, starter_adapter: Path) -> None:
    """Our decode loop with the adapter attached against PEFT's generate(do_sample=False) on the same prompt ids. Both
    run PEFT's layers, but generate builds its mask, positions and cache its own way, so float32 sums are ordered
    differently (about 1e-4 on the logits): the ids must match until the first step where they differ, and there
    the two tokens must be a near-tie in PEFT's own logits (within 1e-2, far below the whole logits a missing or
    misscaled adapter moves them by)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pocketlm.backends.base import ChatMessage

    model = TorchBackend().load(starter_checkpoint, LoadOptions(context_length=1024, adapters=(AdapterSpec(starter_adapter),)))
    try:
        prompt = model._render([ChatMessage("user", "Write a short poem about the sea.")])
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(starter_checkpoint, dtype=torch.float32).eval(), str(starter_adapter))
        with torch.inference_mode():
            output = reference.generate(
                input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                max_new_tokens=24, pad_token_id=2, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
            with reference.disable_adapter():
                base_first = reference(input_ids=torch.tensor([prompt])).logits[0, -1]
        generated = output.sequences[0, len(prompt) :].tolist()
        assert len(generated) >= 8, "PEFT ended the poem almost at once: pick a longer-answer prompt"
        assert float((output.logits[0][0] - base_first).abs().max()) > VISIBLE, "the adapter must move the answer"
        ours: list[int] = []
        with model._decoding(prompt, SamplingParams(temperature=0)) as steps:
            for _ in range(len(generated)):
                ours.append(steps.next_token())
                steps.advance(ours[-1])
    finally:
        model.close()
    differing = next((index for index, (mine, theirs) in enumerate(zip(ours, generated)) if mine != theirs), None)
    if differing is not None:
        logits = output.logits[differing][0].float()
        gap = float(logits[generated[differing]] - logits[ours[differing]])
        assert gap <= 1e-2, f"token {differing}: ours {ours[differing]} is {gap:.3f} below PEFT's {generated[differing]}, not a tie"


def test_an_adapter_on_a_gptq_model_gives_pefts_logits(gptq_checkpoint: Path, starter_checkpoint: Path, starter_adapter: Path) -> None:
    """PEFT wraps gptqmodel's quantized layers (GPTQLoraLinear) on the CPU too; the backend goes through the very same
    layers as transformers + PEFT on the same GPTQ checkpoint, so the logits agree as on the tiny model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pocketlm.backends.gptq_runtime import prepare_gptq

    tokens = list(range(100, 140))
    model = TorchBackend().load(gptq_checkpoint, LoadOptions(context_length=256, adapters=(AdapterSpec(starter_adapter),)))
    try:
        ours = model.token_logits(tokens)
        model.set_adapters([])
        base = model.token_logits(tokens)
    finally:
        model.close()
    prepare_gptq()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gptq_checkpoint, device_map="cpu", dtype=torch.float32).eval(), str(starter_adapter))
    with torch.inference_mode():
        theirs = reference(input_ids=torch.tensor([tokens])).logits[0].float().numpy()
    assert float(np.abs(theirs - base).max()) > VISIBLE
    assert float(np.abs(ours - theirs).max()) <= 1e-4  # logits of the real model are O(10-30): same path, float32
