"""PEFT LoRA → mlx-lm adapter folder, checked the strictest way there is: mlx-lm's own `load_adapters` on mlx-lm's own
load of the tiny base gives the logits transformers+PEFT gives, for a plain, an rsLoRA and a rank/alpha-patterned
adapter (tiny_llama and tiny_adapters from tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("peft")

import numpy as np  # noqa: E402

from pocketlm.converters.adapter_settings import AdapterConversionSettings  # noqa: E402
from pocketlm.converters.base import ConversionError, ConvertOptions  # noqa: E402
from pocketlm.converters.lora_mlx import PeftToMLXLora  # noqa: E402
from pocketlm.models.errors import Cancelled  # noqa: E402
from pocketlm.models.peft_adapter import AdapterError  # noqa: E402
from pocketlm.models.progress import ProgressUpdate, ignore_progress  # noqa: E402

TOKENS = list(range(1, 41))  # 40 ids of the 600-token vocabulary: every position, both layers, the whole MLP
# Everything is float32 on both sides (PEFT's f32 model, MLX on the CPU, the bf16 adapter widened exactly), so the
# only differences are summation order: measured about 1e-5 on logits of size up to ~5, while the adapters move the
# logits by 0.5 to 2. 1e-3 leaves 100× margin and still fails on any wrong scale, transpose or missing module.
TOLERANCE = 1e-3


def peft_logits(base: Path, adapters: Sequence[tuple[Path, float]], tokens: Sequence[int] = TOKENS) -> np.ndarray:
    """transformers+PEFT's logits (f32, eval) for `tokens` with every adapter in `adapters` active at its scale (PEFT's
    set_scale); none: the base model."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapters:
        names = [f"adapter{index}" for index in range(len(adapters))]
        model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0]).eval()
        for name, (path, _) in zip(names[1:], adapters[1:], strict=True):
            model.load_adapter(path, adapter_name=name)
        model.base_model.set_adapter(names)
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                for name, (_, scale) in zip(names, adapters, strict=True):
                    layer.set_scale(name, scale)
    with torch.no_grad():
        return model(torch.tensor([list(tokens)])).logits[0].float().numpy()


def convert(adapter: Path, base: Path | None, destination: Path) -> Path:
    options = ConvertOptions(settings=AdapterConversionSettings(base=base))
    return PeftToMLXLora().convert(adapter, destination, options, ignore_progress).path


@pytest.fixture(scope="module")
def mlx_folders(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlx-lora")
    return {name: convert(folder, tiny_llama, root / name) for name, folder in tiny_adapters.items()}


def mlx_lm_logits(base: Path, adapter: Path | None) -> np.ndarray:
    """mlx-lm's own path: load_model (with the RoPE keys transformers 5 hides, as the backend passes them) and, when
    given, load_adapters."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    from pocketlm.backends.mlx import rope_overrides

    model, _ = load_model(base, model_config=rope_overrides(json.loads((base / "config.json").read_text())))
    if adapter is not None:
        load_adapters(model, str(adapter))
    return np.array(model(mx.array(TOKENS)[None])[0].astype(mx.float32))


@pytest.mark.parametrize("name", ["plain", "rslora", "patterned"])
def test_mlx_lms_own_load_adapters_on_the_output_gives_pefts_logits(name: str, tiny_llama: Path, tiny_adapters: dict[str, Path],
                                                                    mlx_folders: dict[str, Path]) -> None:  # fmt: skip
    expected = peft_logits(tiny_llama, [(tiny_adapters[name], 1.0)])
    assert np.abs(expected - peft_logits(tiny_llama, [])).max() > 0.1  # the adapter matters, so equality means something
    difference = np.abs(mlx_lm_logits(tiny_llama, mlx_folders[name]) - expected).max()
    assert difference < TOLERANCE, f"max |logit difference| {difference:.2e}"


def test_the_config_has_one_rank_one_scale_and_counts_layers_from_the_last(mlx_folders: dict[str, Path], tiny_adapters: dict[str, Path]) -> None:
    import mlx.core as mx

    from pocketlm.models.peft_adapter import read_peft_adapter

    config = json.loads((mlx_folders["patterned"] / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["num_layers"] == 1  # layer 1 only, of 2: the last one
    # rank 4 (down_proj's rank 2 padded) and alpha 8 / 4 = 2, the scale of all modules but q_proj and down_proj
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": list(read_peft_adapter(tiny_adapters["patterned"]).target_names)}
    weights = mx.load(str(mlx_folders["patterned"] / "adapters.safetensors"))
    down = np.array(weights["model.layers.1.mlp.down_proj.lora_a"])
    assert down.shape == (128, 4) and not down[:, 2:].any() and down[:, :2].any()
    peft = read_peft_adapter(tiny_adapters["patterned"])
    q_proj = next(m for m in peft.modules if m.module == "model.layers.1.self_attn.q_proj")
    _, b = peft.load_pair(q_proj)
    # q_proj's alpha 3 / rank 4 = 0.75, against the file's 2: the ratio is folded into its lora_b
    np.testing.assert_allclose(np.array(weights["model.layers.1.self_attn.q_proj.lora_b"]), b.T * (0.75 / 2.0), rtol=1e-6)
    rslora = json.loads((mlx_folders["rslora"] / "adapter_config.json").read_text())["lora_parameters"]
    assert rslora["scale"] == pytest.approx(4.0 / np.sqrt(8)) and rslora["rank"] == 8


def test_a_conversion_without_a_base_model_is_refused_with_a_sentence(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="needs its base model"):
        convert(tiny_adapters["plain"], None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_with_fewer_layers_than_the_adapter_changes_is_refused(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "one-layer"
    base.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    shutil.copy(tiny_llama / "model.safetensors", base)
    # models/adapter_fit's sentence: the converter checks its base as the backends check theirs.
    with pytest.raises(AdapterError, match="patterned changes layer 1, but one-layer has only 1 layers"):
        convert(tiny_adapters["patterned"], base, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-layer"]


def test_a_gguf_base_is_refused_with_a_sentence(tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConversionError, match="not a model folder"):
        convert(tiny_adapters["plain"], gguf, tmp_path / "out")


def test_lm_head_lora_is_refused_with_a_sentence(tiny_llama: Path, tmp_path: Path) -> None:
    """mlx-lm's keys name modules inside each decoder layer; a tied model has no lm_head module at all."""
    from tests.adapter_fixtures import build_peft_adapter

    # PEFT also saves lm_head's own weight beside such a LoRA (save_embedding_layers), which the reader refuses before
    # this converter sees it; without it, the LoRA on lm_head is what is left to refuse.
    adapter = build_peft_adapter(tiny_llama, tmp_path / "head", targets=("q_proj", "lm_head"), save_embedding_layers=False)
    with pytest.raises(ConversionError, match="changes lm_head, outside the decoder layers"):
        convert(adapter, tiny_llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_cancelled_conversion_leaves_nothing_behind(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    options = ConvertOptions(settings=AdapterConversionSettings(base=tiny_llama))

    def cancel_halfway(update: ProgressUpdate) -> None:
        if update.completed == 3:
            options.cancel.set()

    with pytest.raises(Cancelled):
        PeftToMLXLora().convert(tiny_adapters["plain"], tmp_path / "out", options, cancel_halfway)
    assert list(tmp_path.iterdir()) == []


def test_a_new_conversion_replaces_the_old_output_whole(tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path) -> None:
    destination = convert(tiny_adapters["second"], tiny_llama, tmp_path / "out")
    (destination / "stale.txt").write_text("from before")
    convert(tiny_adapters["plain"], tiny_llama, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert json.loads((destination / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 4
    shutil.rmtree(destination)


@pytest.mark.parametrize(("alpha_pattern", "scale"), [({"q_proj": 0, "k_proj": 0}, 2.0), ({"q_proj": 0, "k_proj": 0, "v_proj": 0}, 1.0)])
def test_modules_of_alpha_zero_never_decide_the_scale(alpha_pattern: dict[str, int], scale: float, tiny_llama: Path, tmp_path: Path) -> None:
    """Most modules at alpha 0 (they add nothing) must not make the adapter's scale 0, which no other module's B can be
    folded against; all of them at 0: scale 1 and zero B, and the logits are the base's as in PEFT."""
    from tests.adapter_fixtures import build_peft_adapter

    peft = build_peft_adapter(tiny_llama, tmp_path / "zeros", rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj"), alpha_pattern=alpha_pattern)
    folder = convert(peft, tiny_llama, tmp_path / "mlx")
    assert json.loads((folder / "adapter_config.json").read_text())["lora_parameters"]["scale"] == scale
    difference = np.abs(mlx_lm_logits(tiny_llama, folder) - peft_logits(tiny_llama, [(peft, 1.0)])).max()
    assert difference < TOLERANCE, f"max |logit difference| {difference:.2e}"
