"""PEFT LoRA adapter → mlx-lm adapter folder (`adapter_config.json` + `adapters.safetensors`), the format mlx-lm's
trainer writes and its `load_adapters` reads, and which pocketlm's MLX backend attaches at runtime.

mlx-lm's LoRALinear adds `scale · (x @ lora_a) @ lora_b` with lora_a in × r and lora_b r × out, so lora_a is PEFT's A
transposed and lora_b PEFT's B transposed. Its format has one rank and one scale for the whole adapter, and LoRA on the
last `num_layers` decoder layers at every module named in `keys`:
- modules of a lower rank (PEFT's rank_pattern) are padded with zero columns of A and zero rows of B, which add nothing;
- a module whose scale differs from the adapter's (alpha_pattern, or a rank pattern's alpha/r) has the ratio folded
  into its lora_b, so `scale · lora_b` is exactly PEFT's factor times B;
- `num_layers` counts from the last layer, so the base model's layer count is needed: an adapter on layers 1..2 of a
  3-layer model is num_layers 2. A layer inside that range the adapter leaves alone gets mlx-lm's zero-initialised
  lora_b, which adds nothing.
LoRA outside the decoder layers (lm_head) is refused: mlx-lm keys are per layer, and a tied model has no lm_head module.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pocketlm.converters.adapter_settings import AdapterConversionSettings
from pocketlm.converters.base import ConversionError, ConversionResult, ConvertOptions, atomic_output, check_cancel, settings_of
from pocketlm.converters.mlx import mlx_runtime_missing
from pocketlm.models.adapter_fit import BaseShapes, check_fits, read_base_shapes
from pocketlm.models.mlx_adapter import MLX_ADAPTER_WEIGHTS
from pocketlm.models.peft_adapter import ADAPTER_CONFIG, PeftAdapter, read_peft_adapter
from pocketlm.models.progress import ProgressCallback, ProgressUpdate

if TYPE_CHECKING:
    import numpy as np

class PeftToMLXLora:
    name: ClassVar[str] = "lora-to-mlx"
    source_formats: ClassVar[frozenset[str]] = frozenset({"peft-lora"})
    target_format: ClassVar[str] = "mlx-lora"
    label: ClassVar[str] = "MLX LoRA adapter (mlx-lm)"
    summary: ClassVar[str] = "The same adapter in mlx-lm's format, in float32, for MLX models of the same base; computes what PEFT computes."
    output_is_folder: ClassVar[bool] = True
    install_hint: ClassVar[str] = "pip install 'pocketlm[mlx]'"
    settings_type: ClassVar[type] = AdapterConversionSettings

    @classmethod
    def is_available(cls) -> bool:
        return not mlx_runtime_missing()

    @classmethod
    def quantizes(cls, settings: object) -> bool:
        return False

    @classmethod
    def output_label(cls, settings: object) -> str:
        return "MLX"

    @classmethod
    def expected_size(cls, parameter_count: int, settings: object) -> int:
        # float32, and padding lower-rank modules to the adapter's largest rank can at most double it (rank patterns).
        return parameter_count * 4 * 2 + 64 * 1024

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        settings = settings_of(self, options)
        assert isinstance(settings, AdapterConversionSettings)
        if missing := mlx_runtime_missing():
            raise ConversionError(f"MLX cannot run here: {missing}", self.install_hint)
        adapter = read_peft_adapter(source)
        _refuse_outside_layers(adapter)
        base = _read_base(settings.base, source.name)
        # Every module's layer and widths, so a wrong base fails here, not at attach time.
        check_fits(adapter, base)
        check_cancel(options)
        config, tensors = mlx_adapter_contents(adapter, base.layer_count, options, on_progress)
        if not config["model"] and settings.base is not None:
            config["model"] = str(settings.base)
        import mlx.core as mx

        with atomic_output(destination, folder=True) as folder:
            # mlx-lm's trainer writes its adapters with mx.save_safetensors too, so the file is byte-for-byte its kind.
            mx.save_safetensors(str(folder / MLX_ADAPTER_WEIGHTS), {name: mx.array(value) for name, value in tensors.items()})
            (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
            check_cancel(options)
        return ConversionResult(destination, "convert LoRA to MLX float32")


def _read_base(base: Path | None, adapter_name: str) -> BaseShapes:
    """The base model folder's layer count and module shapes (models/adapter_fit reads them for its fit check too)."""
    if base is None:
        raise ConversionError(f"Converting {adapter_name} to mlx-lm's format needs its base model: mlx-lm counts an adapter's layers from the last one.",
                              "Give the base model folder the adapter is for.")  # fmt: skip
    if not base.is_dir():
        raise ConversionError(f"{base.name} is not a model folder; an mlx-lm adapter is for an MLX or safetensors model folder.",
                              "Give the base model's folder (config.json and *.safetensors), not a GGUF file.")  # fmt: skip
    shapes = read_base_shapes(base)
    if shapes.layer_count <= 0:
        raise ConversionError(f"{base.name}'s config.json gives no num_hidden_layers, so its layer count is unknown.", "Give the base model's folder.")
    return shapes


def _refuse_outside_layers(adapter: PeftAdapter) -> None:
    outside = [m.module for m in adapter.modules if m.layer is None]
    if outside:
        raise ConversionError(f"{adapter.folder.name} changes {outside[0]}, outside the decoder layers, which mlx-lm adapters cannot hold.",
                              "Train the adapter on the attention and MLP projections only, or merge it with PEFT (merge_and_unload).")  # fmt: skip


def mlx_adapter_contents(adapter: PeftAdapter, layer_count: int, options: ConvertOptions,
                         on_progress: ProgressCallback) -> tuple[dict, dict[str, np.ndarray]]:  # fmt: skip
    """The adapter_config.json object and the tensors (name → float32 array) of `adapter` in mlx-lm's format."""
    import numpy as np

    rank = max(m.rank for m in adapter.modules)
    scale = common_scale(adapter)
    tensors: dict[str, np.ndarray] = {}
    for index, module in enumerate(adapter.modules, start=1):
        a, b = adapter.load_pair(module)
        lora_a = np.zeros((module.in_features, rank), dtype=np.float32)
        lora_b = np.zeros((rank, module.out_features), dtype=np.float32)
        lora_a[:, : module.rank] = a.T
        lora_b[: module.rank] = b.T * np.float32(module.scale / scale)  # 0 for a module of alpha 0: it adds nothing
        tensors[f"{module.module}.lora_a"], tensors[f"{module.module}.lora_b"] = lora_a, lora_b
        on_progress(ProgressUpdate(f"Converting {module.module}", index, len(adapter.modules)))
        check_cancel(options)
    config = {
        "fine_tune_type": "lora",
        "num_layers": layer_count - adapter.layers[0],
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(adapter.target_names)},
        "model": adapter.base_model,
    }
    return config, tensors


def common_scale(adapter: PeftAdapter) -> float:
    """The scale most modules have, so a uniform adapter (the usual case) is written with no folding at all. A module
    of alpha 0 (alpha_pattern) adds nothing whatever the scale, so it never decides it; when all do, 1 with zero B."""
    scales = Counter(m.scale for m in adapter.modules if m.scale != 0)
    return scales.most_common(1)[0][0] if scales else 1.0
