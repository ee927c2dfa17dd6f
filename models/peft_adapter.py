"""A PEFT LoRA adapter folder, read from its files: which base modules it changes, at what rank and scale.

PEFT saves `adapter_config.json` (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, ...) and
`adapter_model.safetensors`, whose tensors are named `base_model.model.<module>.lora_A.weight` (rank × in) and
`...lora_B.weight` (out × rank). PEFT adds `scale · (x Aᵀ) Bᵀ` to each target module's output, with scale = alpha / r,
or alpha / √r with rsLoRA, the pattern entries overriding r and alpha per module. Everything here is read from the
header and config alone: tensors are read only by `load_pair`, when a converter or backend needs them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.models.adapter_files import ADAPTER_CONFIG, AdapterError, dominant_dtype, layer_of, lora_pairs, read_adapter_config, short_name
from pocketlm.models.errors import PocketError
from pocketlm.models.safetensors_header import TensorEntry, read_float_tensor, read_safetensors_header

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "LoraModule", "PeftAdapter", "is_peft_adapter", "read_peft_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_DAMAGED_HINT = "Copy or download the adapter again."
# base_model.model.<module>.lora_A[.<adapter name>].weight; older PEFT versions kept the adapter's name in the key.
_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One base-model module the adapter changes."""

    module: str  # its path in the transformers model: "model.layers.0.self_attn.q_proj"
    a_tensor: TensorEntry  # where its matrices are in the adapter file
    b_tensor: TensorEntry
    rank: int
    in_features: int
    out_features: int
    scale: float  # PEFT's factor at strength 1: alpha / rank, or alpha / √rank with rsLoRA (patterns applied)
    layer: int | None  # the decoder layer it is in; None outside the layers (lm_head)

    @property
    def short_name(self) -> str:
        """The module's name inside its layer: "self_attn.q_proj" (what mlx-lm calls a LoRA key)."""
        return short_name(self.module)


@dataclass(frozen=True)
class PeftAdapter:
    folder: Path
    weights: Path
    base_model: str  # base_model_name_or_path as PEFT wrote it (a Hub repo id or a local path); "" when unset
    rank: int  # the config's r (rank_pattern may differ per module)
    alpha: float  # the config's lora_alpha
    use_rslora: bool
    dtype: str  # the stored tensors' type: "F32", "F16" or "BF16"
    modules: tuple[LoraModule, ...]  # sorted by module path

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers it changes, ascending."""
        return tuple(sorted({m.layer for m in self.modules if m.layer is not None}))

    @property
    def target_names(self) -> tuple[str, ...]:
        """The distinct module names it changes inside a layer ("mlp.down_proj", "self_attn.q_proj"), sorted."""
        return tuple(sorted({m.short_name for m in self.modules}))

    @property
    def parameter_count(self) -> int:
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules)

    def load_pair(self, module: LoraModule) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of `module` as float32 arrays, A rank × in and B out × rank, as PEFT stores them."""
        return read_float_tensor(self.weights, module.a_tensor), read_float_tensor(self.weights, module.b_tensor)


def is_peft_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_peft_adapter(folder: Path) -> PeftAdapter:
    """The adapter in `folder`, checked whole (config, tensor names, shapes, ranks); refused with a sentence when it is
    not a LoRA pocketlm can apply."""
    folder = Path(folder)
    config = read_adapter_config(folder, "a PEFT adapter", "Give the folder PEFT's save_pretrained wrote.", _DAMAGED_HINT)
    _refuse_unsupported(config, folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (folder / n).is_file()]
        if pickled:
            raise AdapterError(f"{folder.name} holds its weights only as {pickled[0]} (pickle), which pocketlm never loads: unpickling can run any code.",
                               "Save the adapter with safetensors (PEFT's default: save_pretrained(..., safe_serialization=True)).")  # fmt: skip
        raise AdapterError(f"{folder.name} has an {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}.", "Copy the adapter's weights too.")
    try:
        header = read_safetensors_header(weights)
    except PocketError as error:
        raise AdapterError(f"{folder.name}'s {ADAPTER_WEIGHTS} is damaged: {error.message}", _DAMAGED_HINT) from None
    # A config without lora_alpha gets LoraConfig's default, 8, as PEFT itself would give it (not r).
    rank, alpha = _positive(config.get("r"), "r", folder), _positive(config.get("lora_alpha", 8), "lora_alpha", folder)
    use_rslora = config.get("use_rslora") is True
    rank_pattern = _patterns(config, "rank_pattern", folder, _valid_rank, "a positive whole number")
    alpha_pattern = _patterns(config, "alpha_pattern", folder, _valid_alpha, "a number of at least 0")
    modules = _modules(header.tensors, folder, int(rank), alpha, use_rslora, rank_pattern, alpha_pattern)
    return PeftAdapter(folder, weights, str(config.get("base_model_name_or_path") or ""), int(rank), float(alpha), use_rslora,
                       dominant_dtype(header.tensors), modules)  # fmt: skip


def _refuse_unsupported(config: dict, folder: Path) -> None:
    """Kinds of adapter whose arithmetic pocketlm's backends do not do (yet): each a sentence, never a wrong answer."""
    kind = str(config.get("peft_type") or "LORA").upper()
    if kind != "LORA":
        raise AdapterError(f"{folder.name} is a PEFT {kind} adapter; pocketlm applies LoRA adapters only.", "Train or export a LoRA adapter (peft_type LORA).")
    if config.get("use_dora"):
        raise AdapterError(f"{folder.name} is a DoRA adapter (use_dora), which pocketlm cannot apply yet.", "Merge it into the model with PEFT (merge_and_unload) and convert the result.")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{folder.name} was trained for Conv1D layers (fan_in_fan_out, GPT-2 style), which pocketlm cannot apply.",
                           "Merge it into the model with PEFT (merge_and_unload) and convert the result.")  # fmt: skip
    if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
        raise AdapterError(f"{folder.name} trains biases as well (bias={config.get('bias')!r}), which pocketlm cannot apply yet.",
                           "Merge it into the model with PEFT (merge_and_unload) and convert the result.")  # fmt: skip
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        raise AdapterError(f"{folder.name} carries fully trained modules too (modules_to_save or trainable tokens), which pocketlm cannot apply on top of a model yet.",
                           "Merge it into the model with PEFT (merge_and_unload) and convert the result.")  # fmt: skip
    if config.get("layer_replication"):
        raise AdapterError(f"{folder.name} replicates layers (layer_replication), which pocketlm cannot apply.", "Merge it into the model with PEFT and convert the result.")


def _positive(value: object, key: str, folder: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AdapterError(f"{folder.name}'s {ADAPTER_CONFIG} gives {key} = {value!r}, which is not a positive number.", _DAMAGED_HINT)
    return float(value)


def _valid_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _valid_alpha(value: object) -> bool:
    # PEFT takes a pattern's alpha as written, 0 included (the module then changes nothing).
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _patterns(config: dict, key: str, folder: Path, valid: Callable[[object], bool], wanted: str) -> dict[str, float]:
    """rank_pattern / alpha_pattern, every entry checked: PEFT would fail on a key that is not a regular expression,
    and a value it cannot use must not quietly fall back to r or lora_alpha."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"{folder.name}'s {ADAPTER_CONFIG} gives {key} = {patterns!r}, which is not a mapping of module names to values.", _DAMAGED_HINT)
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as error:
            raise AdapterError(f"{folder.name}'s {ADAPTER_CONFIG} has the {key} key {pattern!r}, which is not a valid regular expression ({error}).",
                               _DAMAGED_HINT) from None  # fmt: skip
        if not valid(value):
            raise AdapterError(f"{folder.name}'s {ADAPTER_CONFIG} gives {key}[{pattern!r}] = {value!r}, which is not {wanted}.", _DAMAGED_HINT)
    return {pattern: float(value) for pattern, value in patterns.items()}


def _pattern_value(patterns: dict[str, float], module: str) -> float | None:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that matches the
    end of the module's path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _stranger(folder: Path) -> Callable[[TensorEntry], AdapterError]:
    def refusal(entry: TensorEntry) -> AdapterError:
        if entry.name.endswith(".base_layer.weight"):
            # save_pretrained's save_embedding_layers="auto" stores the whole lm_head / embed_tokens weight whenever
            # one is a target, and PEFT loads it over the base's: an adapter pocketlm would apply only in part.
            return AdapterError(f"{folder.name}'s {ADAPTER_WEIGHTS} holds a whole base weight, {entry.name}, besides its LoRA matrices.",
                                "Save it with save_pretrained(..., save_embedding_layers=False) if the vocabulary was not resized, or merge it into the model.")  # fmt: skip
        what = "DoRA magnitudes" if "lora_magnitude_vector" in entry.name else "embedding LoRA" if "lora_embedding" in entry.name else "a tensor LoRA does not have"
        return AdapterError(f"{folder.name}'s {ADAPTER_WEIGHTS} holds {entry.name} ({what}), which pocketlm cannot apply.",
                            "Merge it into the model with PEFT (merge_and_unload) and convert the result.")  # fmt: skip

    return refusal


def _modules(entries: tuple[TensorEntry, ...], folder: Path, config_rank: int, alpha: float, use_rslora: bool,
             rank_pattern: dict[str, float], alpha_pattern: dict[str, float]) -> tuple[LoraModule, ...]:  # fmt: skip
    pairs = lora_pairs(entries, _LORA_TENSOR, ("lora_A", "lora_B"), folder, ADAPTER_WEIGHTS, _DAMAGED_HINT, _stranger(folder))
    modules = []
    for module, (a, b) in pairs.items():
        (rank, in_features), (out_features, rank_b) = a.shape, b.shape
        if rank != rank_b or rank == 0:
            raise AdapterError(f"{folder.name}'s {module} has lora_A of rank {rank} but lora_B of rank {rank_b}.", _DAMAGED_HINT)
        pattern_rank = _pattern_value(rank_pattern, module)
        expected = int(pattern_rank) if pattern_rank is not None else config_rank
        if rank != expected:
            # PEFT builds the module at the config's rank and fails loading these matrices (a size mismatch); its
            # scale, alpha / r, would be computed with the config's r, not the tensors'.
            source = "its rank_pattern" if pattern_rank is not None else "r"
            raise AdapterError(f"{folder.name}'s {module} has rank-{rank} matrices, but {source} in {ADAPTER_CONFIG} says rank {expected}.",
                               _DAMAGED_HINT)  # fmt: skip
        pattern_alpha = _pattern_value(alpha_pattern, module)
        module_alpha = pattern_alpha if pattern_alpha is not None else alpha
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        modules.append(LoraModule(module, a, b, rank, in_features, out_features, scale, layer_of(module)))
    return tuple(modules)
