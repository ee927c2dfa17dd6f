"""LoRA adapters on the MLX backend, on one live model: logits equal to transformers+PEFT's for plain, rsLoRA and
rank/alpha-patterned adapters (converted by our PEFT → mlx-lm converter), at scale 0, 0.5 and 1, two stacked; attach,
rescale and detach without reloading; adapters that do not fit refused with a sentence, the active set unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("peft")

import numpy as np  # noqa: E402

from pocketlm.backends.base import AdapterSpec, ChatMessage, LoadOptions, SamplingParams, TextPiece  # noqa: E402
from pocketlm.backends.mlx import MLXBackend, MLXChatModel  # noqa: E402
from pocketlm.models.errors import PocketError  # noqa: E402
from pocketlm.models.peft_adapter import AdapterError  # noqa: E402
from tests.converters.test_lora_mlx import TOKENS, convert, peft_logits  # noqa: E402

# f32 on both sides; differences are summation order only (measured ~1e-5 on logits up to ~5, against adapter effects
# of 0.5 to 2): 1e-3 is 100× that and still catches a wrong scale, transpose or module. See test_lora_mlx.py.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def mlx_folders(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlx-adapters")
    return {name: convert(folder, tiny_llama, root / name) for name, folder in tiny_adapters.items()}


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> Iterator[MLXChatModel]:
    loaded = MLXBackend().load(tiny_llama, LoadOptions(context_length=256))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def base_logits(model: MLXChatModel) -> np.ndarray:
    model.set_adapters(())
    return model.token_logits(TOKENS)


def worst(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def test_the_backend_takes_mlx_lora_adapters() -> None:
    assert MLXBackend.adapter_formats == frozenset({"mlx-lora"})


def test_token_logits_are_float32_one_row_per_token_and_match_the_base(model: MLXChatModel, base_logits: np.ndarray, tiny_llama: Path) -> None:
    assert base_logits.dtype == np.float32 and base_logits.shape == (len(TOKENS), 600)
    assert worst(base_logits, peft_logits(tiny_llama, [])) < TOLERANCE


@pytest.mark.parametrize("name", ["plain", "rslora", "patterned"])
def test_logits_with_a_converted_adapter_equal_pefts(name: str, model: MLXChatModel, mlx_folders: dict[str, Path], tiny_llama: Path,
                                                     tiny_adapters: dict[str, Path], base_logits: np.ndarray) -> None:  # fmt: skip
    model.set_adapters([AdapterSpec(mlx_folders[name])])
    logits = model.token_logits(TOKENS)
    assert worst(logits, base_logits) > 0.1  # the adapter changes the answer, so equality below means something
    difference = worst(logits, peft_logits(tiny_llama, [(tiny_adapters[name], 1.0)]))
    assert difference < TOLERANCE, f"max |logit difference| {difference:.2e}"


def test_scale_zero_is_the_base_model(model: MLXChatModel, mlx_folders: dict[str, Path], base_logits: np.ndarray) -> None:
    model.set_adapters([AdapterSpec(mlx_folders["plain"], scale=0.0)])
    # The same computation as without adapters (a scale-0 adapter adds no term), not merely close to it.
    assert worst(model.token_logits(TOKENS), base_logits) < 1e-6


def test_half_scale_equals_peft_at_set_scale_half(model: MLXChatModel, mlx_folders: dict[str, Path], tiny_llama: Path,
                                                  tiny_adapters: dict[str, Path]) -> None:  # fmt: skip
    model.set_adapters([AdapterSpec(mlx_folders["rslora"], scale=0.5)])
    half = model.token_logits(TOKENS)
    assert worst(half, peft_logits(tiny_llama, [(tiny_adapters["rslora"], 1.0)])) > 0.05  # half is not whole
    assert worst(half, peft_logits(tiny_llama, [(tiny_adapters["rslora"], 0.5)])) < TOLERANCE


def test_two_stacked_adapters_equal_peft_with_both_active(model: MLXChatModel, mlx_folders: dict[str, Path], tiny_llama: Path,
                                                          tiny_adapters: dict[str, Path]) -> None:  # fmt: skip
    model.set_adapters([AdapterSpec(mlx_folders["plain"]), AdapterSpec(mlx_folders["second"], scale=0.7)])
    stacked = model.token_logits(TOKENS)
    assert worst(stacked, peft_logits(tiny_llama, [(tiny_adapters["plain"], 1.0)])) > 0.05  # "second" counts
    assert worst(stacked, peft_logits(tiny_llama, [(tiny_adapters["plain"], 1.0), (tiny_adapters["second"], 0.7)])) < TOLERANCE


def test_attach_rescale_and_detach_change_the_same_live_model(model: MLXChatModel, mlx_folders: dict[str, Path],
                                                               base_logits: np.ndarray) -> None:  # fmt: skip
    inner = model._model  # the loaded weights: never replaced, only the wrappers' terms change
    plain = AdapterSpec(mlx_folders["plain"], name="plain")
    model.set_adapters([plain])
    attached = model.token_logits(TOKENS)
    assert model.description.adapters == (plain,)
    model.set_adapters([AdapterSpec(mlx_folders["plain"], scale=2.0, name="plain")])
    doubled = model.token_logits(TOKENS)
    assert worst(doubled, attached) > 0.1 and model.description.adapters[0].scale == 2.0
    model.set_adapters([plain])
    assert worst(model.token_logits(TOKENS), attached) < 1e-6  # back to the same state: the same numbers
    model.set_adapters(())
    assert model.description.adapters == () and model._model is inner
    assert worst(model.token_logits(TOKENS), base_logits) < 1e-6


def greedy_reply(model: MLXChatModel) -> str:
    events = model.stream_chat([ChatMessage("user", "hello there")], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return "".join(event.text for event in events if isinstance(event, TextPiece))


def test_the_reply_after_a_switch_is_the_reply_a_fresh_load_with_that_adapter_gives(model: MLXChatModel, mlx_folders: dict[str, Path],
                                                                                     tiny_llama: Path) -> None:  # fmt: skip
    """Replies reuse nothing computed before a switch: after replying with "second", switching to "plain" gives what a
    model loaded with "plain" (LoadOptions.adapters) gives, on the same machine and code path."""
    model.set_adapters([AdapterSpec(mlx_folders["second"], scale=3.0)])
    greedy_reply(model)
    model.set_adapters([AdapterSpec(mlx_folders["plain"])])
    after_switch = greedy_reply(model)
    fresh = MLXBackend().load(tiny_llama, LoadOptions(context_length=256, adapters=(AdapterSpec(mlx_folders["plain"]),)))
    try:
        assert fresh.description.adapters == (AdapterSpec(mlx_folders["plain"]),)
        assert after_switch == greedy_reply(fresh)
    finally:
        fresh.close()
        model.set_adapters(())


def mismatched_adapter(plain: Path, destination: Path, rename: dict[str, str] | None = None, widen: bool = False) -> Path:
    """`plain` rewritten as the adapter of another model: module paths renamed (another layer count or architecture),
    or q_proj's inputs widened (another hidden size)."""
    import mlx.core as mx

    destination.mkdir()
    (destination / "adapter_config.json").write_text((plain / "adapter_config.json").read_text())
    weights = {}
    for name, value in mx.load(str(plain / "adapters.safetensors")).items():
        for old, new in (rename or {}).items():
            name = name.replace(old, new)
        if widen and name == "model.layers.0.self_attn.q_proj.lora_a":
            value = mx.zeros((96, value.shape[1]))
        weights[name] = value
    mx.save_safetensors(str(destination / "adapters.safetensors"), weights)
    return destination


@pytest.mark.parametrize(
    ("kind", "sentence"),
    [
        ("layer count", "changes layer 5, but llama has 2 layers"),
        ("architecture", "changes model.layers.0.attn.c_attn, which llama has no linear layer for"),
        ("hidden size", "as 96 → 64 features, but in llama it is 64 → 64"),
    ],
)
def test_an_adapter_of_another_model_is_refused_with_a_sentence_and_the_active_set_stays(
    kind: str, sentence: str, model: MLXChatModel, mlx_folders: dict[str, Path], tmp_path: Path
) -> None:
    changes = {"layer count": {"rename": {"layers.1.": "layers.5."}}, "architecture": {"rename": {"self_attn.q_proj": "attn.c_attn"}},
               "hidden size": {"widen": True}}[kind]  # fmt: skip
    other = mismatched_adapter(mlx_folders["plain"], tmp_path / "other", **changes)
    active = [AdapterSpec(mlx_folders["second"])]
    model.set_adapters(active)
    before = model.token_logits(TOKENS)
    with pytest.raises(AdapterError, match=sentence):
        model.set_adapters([AdapterSpec(mlx_folders["plain"]), AdapterSpec(other)])
    assert model.description.adapters == tuple(active)
    assert worst(model.token_logits(TOKENS), before) < 1e-6
    model.set_adapters(())


def test_a_peft_folder_is_refused_naming_the_format_the_backend_takes(model: MLXChatModel, tiny_adapters: dict[str, Path]) -> None:
    with pytest.raises(AdapterError, match=r"^plain is a PEFT LoRA adapter \(peft-lora\); the mlx backend takes MLX LoRA adapters \(mlx-lora\)\."):
        model.set_adapters([AdapterSpec(tiny_adapters["plain"])])


def test_the_same_adapter_listed_twice_is_refused_not_summed(model: MLXChatModel, mlx_folders: dict[str, Path]) -> None:
    model.set_adapters([AdapterSpec(mlx_folders["second"])])
    with pytest.raises(AdapterError, match="^plain is listed twice"):
        model.set_adapters([AdapterSpec(mlx_folders["plain"]), AdapterSpec(mlx_folders["plain"], scale=0.5)])
    assert model.description.adapters == (AdapterSpec(mlx_folders["second"]),)
    model.set_adapters(())


def test_no_tokens_or_more_than_the_context_are_refused_with_a_sentence(model: MLXChatModel) -> None:
    for tokens in ([], list(range(1, 258))):
        with pytest.raises(PocketError, match=rf"token_logits takes 1 to 256 tokens \(the loaded context\), not {len(tokens)}\."):
            model.token_logits(tokens)


def test_an_adapter_converted_again_in_the_same_folder_is_read_again(model: MLXChatModel, mlx_folders: dict[str, Path],
                                                                     tmp_path: Path) -> None:  # fmt: skip
    folder = Path(shutil.copytree(mlx_folders["plain"], tmp_path / "style"))
    model.set_adapters([AdapterSpec(folder)])
    model.set_adapters(())
    shutil.rmtree(folder)
    shutil.copytree(mlx_folders["second"], folder)
    model.set_adapters([AdapterSpec(folder)])
    again = model.token_logits(TOKENS)
    model.set_adapters([AdapterSpec(mlx_folders["second"])])
    assert worst(again, model.token_logits(TOKENS)) < 1e-6
    model.set_adapters(())


def test_a_closed_model_refuses_adapters_and_scoring_with_a_sentence(tiny_llama: Path, mlx_folders: dict[str, Path]) -> None:
    closed = MLXBackend().load(tiny_llama, LoadOptions(context_length=64))
    closed.close()
    with pytest.raises(PocketError, match="^llama was closed, so it cannot be used any more"):
        closed.set_adapters([AdapterSpec(mlx_folders["plain"])])
    with pytest.raises(PocketError, match="^llama was closed, so it cannot be used any more"):
        closed.token_logits(TOKENS)


def test_an_mlx_lm_dora_adapter_is_refused_with_a_sentence(model: MLXChatModel, mlx_folders: dict[str, Path], tmp_path: Path) -> None:
    dora = mismatched_adapter(mlx_folders["plain"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "dora"}))
    with pytest.raises(AdapterError, match="DoRA"):
        model.set_adapters([AdapterSpec(dora)])


def test_an_adapter_mlx_lms_trainer_wrote_gives_mlx_lms_own_logits(model: MLXChatModel, tiny_llama: Path, tmp_path: Path) -> None:
    """A folder as mlx_lm.lora saves it: LoRALinear on every linear of the last layer (no `keys`), its random lora_a,
    and the trainable parameters saved whole; our backend on it computes what mlx-lm's own model does."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from pocketlm.backends.mlx import rope_overrides

    trained, _ = load_model(tiny_llama, model_config=rope_overrides(json.loads((tiny_llama / "config.json").read_text())))
    trained.freeze()
    parameters = {"rank": 3, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(trained, 1, parameters)
    mx.random.seed(4)
    updates = [(name, mx.random.normal(value.shape) * 0.02) for name, value in tree_flatten(trained.trainable_parameters()) if name.endswith("lora_b")]
    trained.load_weights(updates, strict=False)
    folder = tmp_path / "trained"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(trained.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": parameters,
                                                            "model": str(tiny_llama)}))  # fmt: skip
    expected = np.array(trained(mx.array(TOKENS)[None])[0].astype(mx.float32))
    model.set_adapters([AdapterSpec(folder)])
    try:
        assert worst(model.token_logits(TOKENS), expected) < TOLERANCE
    finally:
        model.set_adapters(())


def test_a_4_bit_mlx_model_takes_the_adapter_as_mlx_lms_load_adapters_does(mlx_folders: dict[str, Path], tiny_llama: Path, tmp_path: Path) -> None:
    """On quantized layers (nn.QuantizedLinear) the adapter adds the same term mlx-lm's LoRALinear adds: PEFT has no
    4-bit MLX model to compare with, mlx-lm does."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    from pocketlm.converters.base import ConvertOptions
    from pocketlm.converters.mlx import MLXConverter, MLXSettings
    from pocketlm.models.progress import ignore_progress

    folder = MLXConverter().convert(tiny_llama, tmp_path / "q4", ConvertOptions(settings=MLXSettings(bits=4, group_size=64)), ignore_progress).path
    reference, _ = load_model(folder)
    reference.set_dtype(mx.float32)  # as the backend computes on a CPU
    base = np.array(reference(mx.array(TOKENS)[None])[0].astype(mx.float32))
    load_adapters(reference, str(mlx_folders["plain"]))
    expected = np.array(reference(mx.array(TOKENS)[None])[0].astype(mx.float32))
    quantized = MLXBackend().load(folder, LoadOptions(context_length=256, adapters=(AdapterSpec(mlx_folders["plain"]),)))
    try:
        assert worst(expected, base) > 0.1
        assert worst(quantized.token_logits(TOKENS), expected) < TOLERANCE
    finally:
        quantized.close()


def test_the_real_model_with_an_adapter_follows_pefts_greedy_answer(starter_checkpoint: Path, tmp_path: Path) -> None:
    """SmolLM2-135M on MLX in float32 with a rank-8 q/v PEFT adapter converted to mlx-lm's format: MLX picks PEFT's
    greedy token at each step of PEFT's answer. Both compute in float32 from the same weights; on this model's logits
    (up to about 40) summation order leaves differences around 1e-4 (measured 1.3e-4), so 0.01 bounds them, while the
    adapter moves the logits by about 4; a step may differ only where PEFT's two best logits are within 0.01."""
    from tests.adapter_fixtures import build_peft_adapter, peft_greedy_answer
    from tests.fixtures import capital_question

    peft_folder = build_peft_adapter(starter_checkpoint, tmp_path / "peft", rank=8, alpha=16.0, targets=("q_proj", "v_proj"), spread=0.03)
    answer = peft_greedy_answer(starter_checkpoint, peft_folder, [{"role": m.role, "content": m.content} for m in capital_question()])
    adapter = convert(peft_folder, starter_checkpoint, tmp_path / "mlx-adapter")
    model = MLXBackend().load(starter_checkpoint, LoadOptions(context_length=512, adapters=(AdapterSpec(adapter),)))
    try:
        got = model.token_logits(answer.tokens)
    finally:
        model.close()
    assert worst(answer.logits, answer.base_logits) > 1.0
    assert worst(got, answer.logits) < 0.01
    answer.check_follows(got, "MLX", near_tie=0.01)
