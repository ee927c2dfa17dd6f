"""Hugging Face checkpoint → MLX folder (float, or 2–8-bit affine quantization, or one of mlx-lm's mixed recipes),
through mlx-lm's own loading, quantizing and saving functions, so the folder is exactly what `mlx_lm.convert` writes.

Why not `mlx_lm.convert.convert` itself: it has no progress callback and no cancel, and it refuses an existing folder
(atomic_output hands us an empty one). Its body is three calls (load, quantize_model, save), done here the same way
with a progress update and a cancel check between them and per decoder layer while the quantized weights are computed.

transformers 5 writes RoPE settings only inside `rope_parameters`; mlx-lm 0.32 reads only a top-level `rope_theta`
and `rope_scaling`, so without a fix a converted SmolLM (theta 100000) silently runs with theta 10000: positions
turn at the wrong rates, harmless over a short prompt and worse the longer the context. The theta and scaling are
copied to the top level, both for the model mlx-lm builds here and in the config.json it writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

from pocketlm.converters.base import ConversionError, ConversionResult, ConvertOptions, atomic_output, check_cancel, settings_of
from pocketlm.models.errors import ModelFileError
from pocketlm.models.formats import ModelFormat, checkpoint_weight_files, inspect_model
from pocketlm.models.progress import ProgressCallback, ProgressUpdate
from pocketlm.models.safetensors_header import read_safetensors_header

BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine quantization packs
GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")
RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  # mlx_lm.convert.QUANT_RECIPES, without importing mlx
_RECIPE_HIGH_BITS = 6  # the most bits any recipe gives a layer (for the disk estimate)
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class MLXSettings:
    bits: int | None = 4  # None: not quantized, every weight in `dtype`
    group_size: int = 64  # input columns sharing one scale and bias
    dtype: str = "float16"  # of the float weights (and of the scales and biases when quantized)
    recipe: str | None = None  # one of mlx-lm's mixed-bit recipes ("mixed_3_6"); overrides `bits`


def mlx_runtime_missing() -> str:
    """Why MLX cannot run here ("" when it can), decided without importing it: on Linux the `mlx` package installs
    without a compute library (libmlx, shipped by mlx-cpu, mlx-cuda or, on macOS, mlx-metal) and then fails at
    import."""
    spec = find_spec("mlx")
    if spec is None or find_spec("mlx_lm") is None:
        return "mlx-lm is not installed."
    folders = [Path(p) / "lib" for p in (spec.submodule_search_locations or [])]
    if not any(f.is_dir() and any(n.name.startswith("libmlx") for n in f.iterdir()) for f in folders):
        return "mlx is installed without a compute library (mlx-cpu on Linux, mlx-metal on macOS)."
    return ""


class MLXConverter:
    name: ClassVar[str] = "mlx"
    source_formats: ClassVar[frozenset[str]] = frozenset({"safetensors"})
    target_format: ClassVar[str] = "mlx"
    label: ClassVar[str] = "MLX (Apple Silicon; mlx-lm)"
    summary: ClassVar[str] = ("About a quarter of float16's size at 4 bits, a little below it in quality (no calibration); "
                              "fast on Apple Silicon through MLX, slower on Linux through MLX's CPU backend.")  # fmt: skip
    output_is_folder: ClassVar[bool] = True
    install_hint: ClassVar[str] = "pip install 'pocketlm[mlx]'"
    settings_type: ClassVar[type] = MLXSettings

    @classmethod
    def is_available(cls) -> bool:
        return not mlx_runtime_missing()

    @classmethod
    def quantizes(cls, settings: object) -> bool:
        s = settings if isinstance(settings, MLXSettings) else MLXSettings()
        return s.bits is not None or s.recipe is not None

    @classmethod
    def output_label(cls, settings: object) -> str:
        s = settings if isinstance(settings, MLXSettings) else MLXSettings()
        if s.recipe is not None:
            return f"MLX-{s.recipe.replace('_', '-')}-g{s.group_size}"
        if s.bits is not None:
            return f"MLX-{s.bits}bit-g{s.group_size}"
        return "MLX-" + {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(s.dtype, s.dtype)

    @classmethod
    def expected_size(cls, parameter_count: int, settings: object) -> int:
        """An upper estimate: every weight at its bits plus one scale and one bias (in `dtype`) per group; float
        weights at `dtype`'s width. Norms and layers left float are a small share; 5% covers them."""
        s = settings if isinstance(settings, MLXSettings) else MLXSettings()
        width = _DTYPE_BYTES.get(s.dtype, 4)
        if not cls.quantizes(s):
            return int(parameter_count * width * 1.05)
        bits = _RECIPE_HIGH_BITS if s.recipe is not None else s.bits or 8
        return int((parameter_count * bits / 8 + parameter_count / s.group_size * 2 * width) * 1.05)

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        settings = settings_of(self, options)
        assert isinstance(settings, MLXSettings)
        check_settings(settings)
        if missing := mlx_runtime_missing():
            raise ConversionError(f"MLX cannot run here: {missing}", self.install_hint)
        config = _read_config(source)
        if self.quantizes(settings):
            _check_group_size(source, settings.group_size)
        check_cancel(options)
        with atomic_output(destination, folder=True) as folder:
            _convert(source, folder, config, settings, options, on_progress)
            check_cancel(options)
        return ConversionResult(destination, _how(settings))


def check_settings(settings: MLXSettings) -> None:
    if settings.recipe is not None and settings.recipe not in RECIPES:
        raise ConversionError(f"{settings.recipe!r} is not one of mlx-lm's mixed-bit recipes.", f"Choose one of {', '.join(RECIPES)}.")
    if settings.bits is not None and settings.bits not in BITS:
        raise ConversionError(f"MLX cannot quantize to {settings.bits} bits.", "Choose 4 or 8 bits (or 2, 3, 5, 6), or none for float weights.")
    if settings.group_size not in GROUP_SIZES:
        raise ConversionError(f"{settings.group_size} is not an MLX group size.", "Choose 32, 64 or 128.")
    if settings.dtype not in DTYPES:
        raise ConversionError(f"MLX does not store weights as {settings.dtype!r}.", "Choose float16, bfloat16 or float32.")


def _how(settings: MLXSettings) -> str:
    """The lineage: "MLX 4-bit g64", "MLX mixed_3_6 g64", "MLX float16"."""
    if settings.recipe is not None:
        return f"MLX {settings.recipe} g{settings.group_size}"
    if settings.bits is not None:
        return f"MLX {settings.bits}-bit g{settings.group_size}"
    return f"MLX {settings.dtype}"


def rope_at_top_level(config: dict[str, Any]) -> dict[str, Any]:
    """The keys to add so that mlx-lm, which reads only top-level `rope_theta` and `rope_scaling`, sees the RoPE that
    a transformers-5 config states in `rope_parameters` (flat, or per layer type as Gemma 3 writes it: the full-attention
    layers' base is `rope_theta`, the sliding ones' `rope_local_base_freq`). Keys already at the top level are kept."""
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict):
        return {}
    found: dict[str, Any] = {}
    flat = parameters if "rope_theta" in parameters else parameters.get("full_attention")
    if isinstance(flat, dict):
        if "rope_theta" in flat:
            found["rope_theta"] = flat["rope_theta"]
        if flat.get("rope_type", "default") != "default":
            found["rope_scaling"] = {k: v for k, v in flat.items() if k != "rope_theta"}
    sliding = parameters.get("sliding_attention")
    if isinstance(sliding, dict) and "rope_theta" in sliding:
        found["rope_local_base_freq"] = sliding["rope_theta"]
    return {k: v for k, v in found.items() if config.get(k) is None}


def _read_config(source: Path) -> dict[str, Any]:
    try:
        facts = inspect_model(source)
    except ModelFileError as error:
        raise ConversionError(error.message, error.hint) from None
    if facts.format == ModelFormat.PYTORCH:
        raise ConversionError(f"{source.name} holds its weights only as pickle files, which pocketlm never loads (they can run code).",
                              "Use a checkpoint with *.safetensors weights.")  # fmt: skip
    if facts.format != ModelFormat.SAFETENSORS:
        raise ConversionError(f"{source.name} is a {facts.format.value} model ({facts.quantization}); MLX conversion starts from a float checkpoint.",
                              "Convert the original safetensors checkpoint instead.")  # fmt: skip
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))  # inspect_model read it as a JSON object
    if config.get("model_file") is not None:
        raise ConversionError(f"{source.name} needs its own Python code to build the model, which pocketlm never runs.",
                              "Use a checkpoint of an architecture mlx-lm supports itself.")  # fmt: skip
    from mlx_lm.utils import _get_classes  # how mlx-lm maps model_type to its model code

    try:
        _get_classes(config)
    except (KeyError, ValueError):
        kind = config.get("model_type") or config.get("architectures") or "unknown"
        raise ConversionError(f"mlx-lm {_mlx_lm_version()} cannot convert {kind!r} models.",
                              "Update mlx-lm (pip install -U mlx-lm), or convert to GGUF instead.") from None  # fmt: skip
    return config


def _mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")


def _check_group_size(source: Path, group_size: int) -> None:
    """Refuse a group size that does not divide some matrix's inputs: mlx-lm would silently leave that layer float."""
    inputs: set[int] = set()
    for name in checkpoint_weight_files(sorted(p.name for p in source.iterdir())):
        for entry in read_safetensors_header(source / name).tensors:
            if entry.name.endswith(".weight") and len(entry.shape) == 2:
                inputs.add(entry.shape[1])
    odd = sorted(n for n in inputs if n % group_size)
    if odd:
        fits = [g for g in sorted(GROUP_SIZES, reverse=True) if all(n % g == 0 for n in inputs)]
        hint = f"Use group size {fits[0]}, which divides every layer." if fits else "No MLX group size divides every layer; convert to GGUF instead."
        raise ConversionError(f"Group size {group_size} does not divide the {odd[0]} inputs of some of this model's layers.", hint)


def _convert(source: Path, folder: Path, config: dict[str, Any], settings: MLXSettings, options: ConvertOptions,
             on_progress: ProgressCallback) -> None:  # fmt: skip
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model, save

    on_progress(ProgressUpdate("Loading the checkpoint"))
    rope = rope_at_top_level(config)
    # lazy: weights are read from disk only when computed, one layer at a time below
    model, mlx_config = load_model(source, lazy=True, model_config=rope)
    tokenizer = load_tokenizer(source, eos_token_ids=mlx_config.get("eos_token_id"))
    check_cancel(options)

    dtype = getattr(mx, settings.dtype)
    cast = getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(lambda k, v: v.astype(dtype) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    if MLXConverter.quantizes(settings):
        on_progress(ProgressUpdate("Quantizing"))
        predicate = mixed_quant_predicate_builder(settings.recipe, model, settings.group_size) if settings.recipe else None
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its bits per weight, which would land in the app's screen
            model, mlx_config = quantize_model(model, mlx_config, settings.group_size, settings.bits or 4, quant_predicate=predicate)
    # Compute the (lazy) weights layer by layer, so progress moves and a cancel is seen within one layer's time.
    layers = list(getattr(model, "layers", []))
    verb = "Quantizing" if MLXConverter.quantizes(settings) else "Converting"
    for index, layer in enumerate(layers, start=1):
        mx.eval([v for _, v in tree_flatten(layer.parameters())])
        on_progress(ProgressUpdate(f"{verb} layer {index} of {len(layers)}", index, len(layers)))
        check_cancel(options)
    mx.eval(model.parameters())
    check_cancel(options)

    on_progress(ProgressUpdate("Saving the MLX model"))
    save(folder, source, model, tokenizer, mlx_config)  # mlx_config holds the RoPE keys load_model was given
    _copy_missing_side_files(source, folder)


def _copy_missing_side_files(source: Path, folder: Path) -> None:
    """A chat template kept beside the checkpoint (chat_template.jinja) if the tokenizer's save did not write it."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)
