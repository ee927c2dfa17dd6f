"""MLX conversion, with the real mlx-lm on MLX's CPU backend: a float checkpoint becomes an MLX folder that mlx-lm
loads and that computes what transformers computes (exactly at float32, closely at 4 and 8 bits), with the RoPE a
transformers-5 config states, and a store entry with its lineage. Skipped where mlx-lm is not installed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from pocketlm.converters.base import ConversionError, ConvertOptions  # noqa: E402
from pocketlm.converters.conversion_job import convert_model  # noqa: E402
from pocketlm.converters.mlx import MLXConverter, MLXSettings, rope_at_top_level  # noqa: E402
from pocketlm.converters.registry import conversion_targets  # noqa: E402
from pocketlm.models.errors import Cancelled  # noqa: E402
from pocketlm.models.formats import ModelFormat, inspect_model  # noqa: E402
from pocketlm.models.progress import ProgressUpdate, ignore_progress  # noqa: E402
from pocketlm.models.store import ModelStore  # noqa: E402
from tests.converters.tiny_models import build_tiny_model, edit_config, train_sentencepiece_tokenizer  # noqa: E402

THETA = 500000.0  # far from mlx-lm's default 10000, so a model built without the checkpoint's RoPE computes other logits
# 48 positions: RoPE's slowest frequencies turn visibly apart between theta 10000 and 500000 only at later positions.
TOKENS = [1, *range(5, 600, 13)][:48]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer llama (hidden 64, feed-forward 128) whose config.json states RoPE only as transformers 5 writes
    it, in `rope_parameters` (the weights do not depend on theta, so the config is edited after saving)."""
    folder = tmp_path_factory.mktemp("mlx-tiny")
    model = build_tiny_model("llama", folder / "llama", train_sentencepiece_tokenizer(folder / "tokenizer"), vocab_size=600)
    edit_config(model, rope_parameters={"rope_theta": THETA, "rope_type": "default"}, rope_theta=None, rope_scaling=None)
    return model


def convert(source: Path, destination: Path, **settings: object) -> Path:
    return MLXConverter().convert(source, destination, ConvertOptions(settings=MLXSettings(**settings)), ignore_progress).path  # type: ignore[arg-type]


def transformers_logits(checkpoint: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


def mlx_logits(folder: Path, **model_config: object) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(folder), model_config=model_config or None)
    logits = model(mx.array([TOKENS]))[0].astype(mx.float32)
    return np.array(logits)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> np.ndarray:
    return transformers_logits(tiny_llama)


def test_float32_mlx_computes_the_logits_transformers_computes_with_the_checkpoint_rope(tiny_llama: Path, reference: np.ndarray,
                                                                                         tmp_path: Path) -> None:  # fmt: skip
    folder = convert(tiny_llama, tmp_path / "f32", bits=None, dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == THETA and "quantization" not in config
    got = mlx_logits(folder)
    # Both float32, same weights and operations; only the summation order differs (about 1e-7 relative per sum over
    # 64–128 terms, through two layers). 1e-4 is far above that and far below the bug's error checked next.
    assert relative_error(got, reference) < 1e-4
    assert (got.argmax(-1) == reference.argmax(-1)).all()
    # The same weights under mlx-lm's default theta (what it used before the fix): the test would catch the bug.
    assert relative_error(mlx_logits(folder, rope_theta=10000.0), reference) > 1e-2


def test_quantized_weights_are_the_float_weights_rounded_to_the_nearest_step(tiny_llama: Path, tmp_path: Path) -> None:
    import mlx.core as mx
    from safetensors.numpy import load_file

    folder = convert(tiny_llama, tmp_path / "q4", bits=4, group_size=32, dtype="float32")
    stored, source = mx.load(str(folder / "model.safetensors")), load_file(str(tiny_llama / "model.safetensors"))
    quantized = [k.removesuffix(".scales") for k in stored if k.endswith(".scales")]
    assert len(quantized) == 2 * 7 + 2  # every linear of both layers, the embeddings and the head
    for prefix in quantized:
        weight, scales = source[f"{prefix}.weight"], np.abs(np.repeat(np.array(stored[f"{prefix}.scales"]), 32, axis=-1))
        dequantized = np.array(mx.dequantize(stored[f"{prefix}.weight"], stored[f"{prefix}.scales"], stored[f"{prefix}.biases"], 32, 4))
        steps = np.abs(dequantized - weight) / scales
        # MLX puts the group's larger-magnitude end exactly on the 16-level grid (so the step is a little coarser than
        # range / 15, and the other end may be up to a step off); the rest round to the nearest level, a quarter of a
        # step off on average. A wrong scale, bias, bit order or group layout puts weights many steps away.
        assert steps.max() < 1 + 1e-4, prefix
        assert steps.mean() < 0.3, prefix


def test_4_and_8_bit_mlx_stay_close_to_the_float_logits_and_8_bits_much_closer(tiny_llama: Path, reference: np.ndarray,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    errors = {}
    for bits in (4, 8):
        folder = convert(tiny_llama, tmp_path / f"q{bits}", bits=bits, group_size=32, dtype="float32")
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"} and config["rope_theta"] == THETA
        errors[bits] = relative_error(mlx_logits(folder), reference)
    # 16 levels over a group of 32 Gaussian weights (a range of about 4.5 sigma) leave each weight off by about 9% of
    # sigma (step / sqrt 12; measured 8%). This random model, with norm weights away from 1, amplifies a weight error
    # about fivefold into its logits (measured 43% at 4 bits, 2.6% at 8): the bounds leave room for that, and 256
    # levels (a step 17 times finer) must be at least 8 times closer, which a mis-scaled or mis-ordered group breaks.
    assert errors[4] < 0.6
    assert errors[8] < 0.05
    assert errors[8] < errors[4] / 8


def test_rope_parameters_are_copied_to_the_keys_mlx_lm_reads() -> None:
    assert rope_at_top_level({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}) == {"rope_theta": 100000.0}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert rope_at_top_level({"rope_parameters": {**llama3, "rope_theta": THETA}}) == {"rope_theta": THETA, "rope_scaling": llama3}
    gemma3 = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    assert rope_at_top_level({"rope_parameters": gemma3}) == {"rope_theta": 1e6, "rope_local_base_freq": 10000.0}
    assert rope_at_top_level({"rope_theta": 5.0, "rope_parameters": {"rope_theta": 5.0}}) == {}  # an older config already says it


def test_progress_names_each_phase_and_layer(tiny_llama: Path, tmp_path: Path) -> None:
    updates: list[ProgressUpdate] = []
    MLXConverter().convert(tiny_llama, tmp_path / "out", ConvertOptions(settings=MLXSettings(bits=4, group_size=32)), updates.append)
    assert [(u.description, u.completed, u.total) for u in updates] == [
        ("Loading the checkpoint", 0, None), ("Quantizing", 0, None), ("Quantizing layer 1 of 2", 1, 2),
        ("Quantizing layer 2 of 2", 2, 2), ("Saving the MLX model", 0, None)]  # fmt: skip


def test_a_group_size_that_does_not_divide_a_layer_is_refused_with_one_that_does(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as refused:
        convert(tiny_llama, tmp_path / "out", bits=4, group_size=128)  # the attention projections have 64 inputs
    assert "Group size 128 does not divide the 64 inputs" in refused.value.message
    assert "Use group size 64" in refused.value.hint
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("settings", "words"), [({"bits": 7}, "7 bits"), ({"group_size": 48}, "group size"),
                                                 ({"dtype": "int8"}, "int8"), ({"recipe": "mixed_1_9"}, "recipes")])  # fmt: skip
def test_settings_mlx_cannot_write_are_refused_with_a_sentence(tiny_llama: Path, tmp_path: Path, settings: dict, words: str) -> None:
    with pytest.raises(ConversionError, match=words):
        convert(tiny_llama, tmp_path / "out", **settings)


def test_a_pickle_only_checkpoint_and_an_architecture_mlx_lm_lacks_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02not loaded")
    with pytest.raises(ConversionError, match="pickle"):
        convert(pickled, tmp_path / "out")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for file in tiny_llama.iterdir():
        (unknown / file.name).write_bytes(file.read_bytes())
    edit_config(unknown, model_type="pocket_unknown", architectures=["PocketUnknownForCausalLM"])
    with pytest.raises(ConversionError, match="cannot convert 'pocket_unknown' models") as refused:
        convert(unknown, tmp_path / "out")
    assert "GGUF" in refused.value.hint
    assert not (tmp_path / "out").exists()


def test_an_mlx_folder_is_not_converted_again(tiny_llama: Path, tmp_path: Path) -> None:
    first = convert(tiny_llama, tmp_path / "once", bits=4, group_size=32)
    with pytest.raises(ConversionError, match="is a mlx model"):
        convert(first, tmp_path / "twice")


def test_cancel_during_quantization_leaves_no_folder_and_keeps_an_earlier_output(tiny_llama: Path, tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "earlier.txt").write_text("an earlier conversion")
    cancel = threading.Event()

    def cancel_at_layer_one(update: ProgressUpdate) -> None:
        if update.description.startswith("Quantizing layer 1"):
            cancel.set()

    options = ConvertOptions(settings=MLXSettings(bits=4, group_size=32), cancel=cancel)
    with pytest.raises(Cancelled):
        MLXConverter().convert(tiny_llama, destination, options, cancel_at_layer_one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder beside it
    assert [p.name for p in destination.iterdir()] == ["earlier.txt"]


def test_the_conversion_job_registers_the_folder_as_mlx_with_bits_group_size_and_lineage(model_store: ModelStore, tiny_llama: Path) -> None:
    source = model_store.register(tiny_llama, source=f"import:{tiny_llama}", name="owner/tiny")
    result = convert_model(model_store, source, "mlx", ConvertOptions(settings=MLXSettings(bits=4, group_size=32)))
    assert (result.name, result.format, result.quantization) == ("owner/tiny:MLX-4bit-g32", "mlx", "4-bit g32")
    assert (result.parent, result.lineage) == ("owner/tiny", "MLX 4-bit g32")
    assert result.path.is_dir() and (result.path / "model.safetensors").is_file()
    stored = model_store.get(result.name)
    assert stored is not None and (stored.format, stored.lineage, stored.path) == ("mlx", "MLX 4-bit g32", result.path)
    facts = inspect_model(result.path)
    assert facts.format == ModelFormat.MLX and facts.parameter_count == inspect_model(tiny_llama).parameter_count


def test_the_converter_describes_itself_and_is_a_conversion_target() -> None:
    assert MLXConverter.output_label(MLXSettings()) == "MLX-4bit-g64"
    assert MLXConverter.output_label(MLXSettings(bits=None)) == "MLX-F16"
    assert MLXConverter.output_label(MLXSettings(recipe="mixed_3_6")) == "MLX-mixed-3-6-g64"
    assert MLXConverter.quantizes(MLXSettings()) and not MLXConverter.quantizes(MLXSettings(bits=None))
    # 135M weights: about 76 MB at 4 bits g64 (with float16 scales and biases), 270 MB in float16; never under.
    assert 76e6 < MLXConverter.expected_size(134_515_008, MLXSettings()) < 100e6
    assert 269e6 < MLXConverter.expected_size(134_515_008, MLXSettings(bits=None)) < 300e6
    targets = {target.format: target for target in conversion_targets()}
    assert targets["mlx"].available and targets["mlx"].settings_type is MLXSettings


def test_a_mixed_recipe_gives_the_sensitive_layers_more_bits(tiny_llama: Path, tmp_path: Path) -> None:
    folder = convert(tiny_llama, tmp_path / "mixed", recipe="mixed_3_6", group_size=32)
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    # mlx-lm's recipe: 6 bits for the head and for v_proj and down_proj in the last eighth of the layers, 3 elsewhere.
    assert quantization["lm_head"]["bits"] == quantization["model.layers.1.mlp.down_proj"]["bits"] == 6
    assert quantization["model.layers.0.mlp.down_proj"]["bits"] == quantization["model.layers.1.self_attn.q_proj"]["bits"] == 3
    assert inspect_model(folder).format == ModelFormat.MLX


def test_mlx_without_a_compute_library_is_unavailable_with_the_reason_and_nothing_imported(tmp_path: Path) -> None:
    """On Linux, `pip install mlx` without the cpu extra installs the Python package without libmlx; it fails at import.
    A package of that shape, first on the path, stands in for it in a fresh interpreter."""
    import os
    import subprocess
    import sys

    for package in ("mlx", "mlx_lm"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise ImportError('libmlx.so: cannot open shared object file')\n")
    script = ("import sys; from pocketlm.converters.mlx import MLXConverter, mlx_runtime_missing; "
              "print(MLXConverter.is_available(), mlx_runtime_missing(), 'mlx' in sys.modules or 'numpy' in sys.modules, sep='|')")  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120, check=True)
    assert run.stdout.strip() == "False|mlx is installed without a compute library (mlx-cpu on Linux, mlx-metal on macOS).|False"


def test_real_model_converted_to_4_bit_g32_answers_paris(starter_checkpoint: Path, tmp_path: Path) -> None:
    """The real model end to end: greedy decoding, float32 compute (as the backend does on CPU). Its config states
    theta 100000 only in rope_parameters; a short prompt still gets "Paris" under mlx-lm's default 10000 (the angles
    barely differ over 30 positions), so the RoPE fix itself is checked on the tiny model's logits above."""
    import mlx.core as mx
    from mlx_lm import generate, load

    folder = convert(starter_checkpoint, tmp_path / "smol", bits=4, group_size=32)
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 100000.0
    model, tokenizer = load(str(folder))
    model.set_dtype(mx.float32)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=16)
