"""An mlx-lm adapter folder, read from its files: which modules it changes, at what rank, and its one scale.

mlx-lm's trainer (and pocketlm's PEFT → MLX converter) saves `adapter_config.json` — `fine_tune_type` ("lora",
"dora" or "full"), `num_layers`, `lora_parameters` {rank, scale, dropout, keys}, and `model`, the base it was trained
on — and `adapters.safetensors`, whose tensors are `<module>.lora_a` (in × rank) and `<module>.lora_b` (rank × out),
named as the module is in the MLX model ("model.layers.0.self_attn.q_proj"). mlx-lm adds `scale · (x lora_a) lora_b`
to the module's output: one scale for the whole adapter, unlike PEFT's alpha / r per module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.adapter_files import ADAPTER_CONFIG, AdapterError, dominant_dtype, layer_of, lora_pairs, read_adapter_config, short_name
from pocketlm.models.errors import PocketError
from pocketlm.models.safetensors_header import TensorEntry, read_safetensors_header

MLX_ADAPTER_WEIGHTS = "adapters.safetensors"
_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>a|b)$")
_MERGE_HINT = "Fuse it into the model with mlx_lm.fuse and use the fused model, or train a LoRA (fine_tune_type lora)."


@dataclass(frozen=True)
class MLXLoraModule:
    """One model module the adapter changes."""

    module: str  # its path in the MLX model: "model.layers.0.self_attn.q_proj"
    a_tensor: TensorEntry  # lora_a, in × rank
    b_tensor: TensorEntry  # lora_b, rank × out
    rank: int
    in_features: int
    out_features: int
    layer: int | None  # the decoder layer it is in; None outside the layers

    @property
    def short_name(self) -> str:
        """The module's name inside its layer: "self_attn.q_proj" (an mlx-lm LoRA key)."""
        return short_name(self.module)


@dataclass(frozen=True)
class MLXAdapter:
    folder: Path
    weights: Path
    base_model: str  # the config's "model" (a Hub repo id or a local path); "" when unset
    rank: int  # lora_parameters.rank
    scale: float  # lora_parameters.scale: the factor of every module's term at strength 1
    num_layers: int  # how many of the last decoder layers mlx-lm wraps (-1: all)
    dtype: str  # the stored tensors' type: "F32", "F16" or "BF16"
    modules: tuple[MLXLoraModule, ...]  # sorted by module path

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({m.layer for m in self.modules if m.layer is not None}))

    @property
    def parameter_count(self) -> int:
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules)


def is_mlx_adapter_config(config: dict) -> bool:
    """Whether an adapter_config.json is mlx-lm's (PEFT's has peft_type and r instead)."""
    return "fine_tune_type" in config or isinstance(config.get("lora_parameters"), dict)


def read_mlx_adapter(folder: Path) -> MLXAdapter:
    """The mlx-lm adapter in `folder`, checked whole; DoRA and full fine-tunes are refused with a sentence."""
    folder = Path(folder)
    config = read_adapter_config(folder, "an mlx-lm adapter", "Give the folder mlx-lm's trainer wrote.", "Copy the adapter again.")
    kind = str(config.get("fine_tune_type") or "lora")
    if kind == "dora":
        raise AdapterError(f"{folder.name} is an mlx-lm DoRA adapter, which pocketlm cannot apply yet.", _MERGE_HINT)
    if kind == "full":
        raise AdapterError(f"{folder.name} is an mlx-lm full fine-tune (fine_tune_type full), not an adapter.", _MERGE_HINT)
    if kind != "lora":
        raise AdapterError(f"{folder.name} has fine_tune_type {kind!r}; pocketlm applies LoRA adapters only.", _MERGE_HINT)
    parameters = config.get("lora_parameters")
    if not isinstance(parameters, dict):
        raise AdapterError(f"{folder.name}'s {ADAPTER_CONFIG} has no lora_parameters.", "Copy the adapter again, or save it with mlx-lm.")
    scale = parameters.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdapterError(f"{folder.name}'s {ADAPTER_CONFIG} gives lora_parameters.scale = {scale!r}, which is not a number.",
                           "Copy the adapter again, or save it with mlx-lm.")  # fmt: skip
    weights = folder / MLX_ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{folder.name} has an {ADAPTER_CONFIG} but no {MLX_ADAPTER_WEIGHTS}.", "Copy the adapter's weights too.")
    try:
        header = read_safetensors_header(weights)
    except PocketError as error:
        raise AdapterError(f"{folder.name}'s {MLX_ADAPTER_WEIGHTS} is damaged: {error.message}", "Copy the adapter again.") from None
    modules = _modules(header.tensors, folder)
    rank = parameters.get("rank")
    num_layers = config.get("num_layers")
    return MLXAdapter(
        folder, weights, str(config.get("model") or ""),
        rank if isinstance(rank, int) and not isinstance(rank, bool) else max(m.rank for m in modules), float(scale),
        num_layers if isinstance(num_layers, int) and not isinstance(num_layers, bool) else -1,
        dominant_dtype(header.tensors), modules,
    )  # fmt: skip


def _modules(entries: tuple[TensorEntry, ...], folder: Path) -> tuple[MLXLoraModule, ...]:
    def stranger(entry: TensorEntry) -> AdapterError:
        return AdapterError(f"{folder.name}'s {MLX_ADAPTER_WEIGHTS} holds {entry.name}, which a LoRA adapter does not have.", _MERGE_HINT)

    modules = []
    for module, (a, b) in lora_pairs(entries, _LORA_TENSOR, ("lora_a", "lora_b"), folder, MLX_ADAPTER_WEIGHTS, "Copy the adapter again.", stranger).items():
        (in_features, rank), (rank_b, out_features) = a.shape, b.shape
        if rank != rank_b or rank == 0:
            raise AdapterError(f"{folder.name}'s {module} has lora_a of rank {rank} but lora_b of rank {rank_b}.", "Copy the adapter again.")
        modules.append(MLXLoraModule(module, a, b, rank, in_features, out_features, layer_of(module)))
    return tuple(modules)
