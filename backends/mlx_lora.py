"""LoRA adapters on a loaded MLX model, switched at runtime: each targeted linear layer is wrapped once in a
MultiLoraLinear, and setting the active adapters only replaces the small matrices those wrappers add.

mlx-lm itself cannot do this: its load_adapters replaces the layers with single-adapter LoRALinear modules (no
stacking), and nothing takes them out again short of reloading the model. Here an adapter is read once (from an mlx-lm
adapter folder: ours or one mlx-lm's trainer wrote) and kept; a wrapper whose module no active adapter changes adds
nothing, so detaching everything gives the base model's logits exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from pocketlm.backends.adapter_format import AdapterKey, adapter_key
from pocketlm.backends.base import AdapterSpec
from pocketlm.models.mlx_adapter import MLXAdapter, read_mlx_adapter
from pocketlm.models.peft_adapter import AdapterError
from pocketlm.models.safetensors_header import read_float_tensor

@dataclass(frozen=True)
class _LoraTerm:
    """What the active adapters add to one layer, all in one pair: the adapters' lora_a side by side (in × Σr) and
    their lora_b stacked (Σr × out), each already multiplied by its scale, so any number of adapters costs two matmuls.
    A plain object, not a tuple: mlx's Module would take a tuple of arrays for parameters (set_dtype, load_weights)."""

    a: mx.array
    b: mx.array


class MultiLoraLinear(nn.Module):
    """A linear layer (float or quantized) plus the sum of its active adapters' terms, as PEFT computes it:
    y = linear(x) + Σ scale_i · (x A_iᵀ) B_iᵀ, with A_iᵀ and B_iᵀ being mlx-lm's lora_a and lora_b."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.term: _LoraTerm | None = None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self.term is None:
            return y
        # float32 matrices, as mlx-lm keeps its LoRA weights; the sum comes back in the model's compute dtype.
        return y + ((x @ self.term.a) @ self.term.b).astype(y.dtype)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a float or quantized linear layer; None for any other module."""
    if isinstance(module, MultiLoraLinear):
        module = module.linear
    if isinstance(module, nn.QuantizedLinear):
        outputs, packed = module.weight.shape
        return packed * 32 // module.bits, outputs
    if isinstance(module, nn.Linear):
        outputs, inputs = module.weight.shape
        return inputs, outputs
    return None


@dataclass(frozen=True)
class _LoadedAdapter:
    pairs: dict[str, tuple[mx.array, mx.array]]  # module path → (lora_a in × r, lora_b r × out), float32
    scale: float  # the file's scale, at strength 1


class MLXAdapters:
    """The adapters read so far for one model, and which of them are active at what scale."""

    def __init__(self, model: Any, model_name: str) -> None:
        self._model = model
        self._model_name = model_name
        self._read: dict[AdapterKey, _LoadedAdapter] = {}
        self._wrapped: dict[str, MultiLoraLinear] = {}

    def activate(self, adapters: Sequence[AdapterSpec]) -> None:
        """Make `adapters` (mlx-lm folders, each once: adapter_format.check_adapter_set) the active set. Every new
        adapter is read and checked before anything changes, so a refused one leaves the previous set active."""
        loaded = [self._adapter(spec) for spec in adapters]
        terms: dict[str, list[tuple[mx.array, mx.array]]] = {}
        for spec, adapter in zip(adapters, loaded, strict=True):
            factor = spec.scale * adapter.scale
            if factor == 0.0:
                continue  # scale 0 is the base model: add nothing rather than a zero
            for module, (a, b) in adapter.pairs.items():
                terms.setdefault(module, []).append((a, b * factor))
        self._wrap([module for module in terms if module not in self._wrapped])
        for module, wrapper in self._wrapped.items():
            pieces = terms.get(module)
            if not pieces:
                wrapper.term = None
                continue
            term = _LoraTerm(mx.concatenate([a for a, _ in pieces], axis=1), mx.concatenate([b for _, b in pieces], axis=0))
            mx.eval(term.a, term.b)  # now, not during the next reply's first token
            wrapper.term = term

    def _wrap(self, modules: list[str]) -> None:
        if not modules:
            return
        named = dict(self._model.named_modules())
        wrappers = {module: MultiLoraLinear(named[module]) for module in modules}
        self._model.update_modules(tree_unflatten(list(wrappers.items())))
        self._wrapped.update(wrappers)

    def _adapter(self, spec: AdapterSpec) -> _LoadedAdapter:
        folder = Path(spec.path).expanduser()
        # Keyed by its files' size and time too: an adapter retrained or converted again in place is read again.
        key = adapter_key(folder)
        if key not in self._read:
            adapter = read_mlx_adapter(folder)
            self._check_fits(adapter)
            pairs = {m.module: (_array(adapter, m.a_tensor), _array(adapter, m.b_tensor)) for m in adapter.modules}
            self._read[key] = _LoadedAdapter(pairs, adapter.scale)
        return self._read[key]

    def _check_fits(self, adapter: MLXAdapter) -> None:
        """Every module the adapter changes is a linear layer of this model with the adapter's widths; else a sentence
        naming what differs (a layer count, a module of another architecture, a hidden size)."""
        named = dict(self._model.named_modules())
        layer_count = len(getattr(self._model, "layers", ()))
        name = adapter.folder.name
        for module in adapter.modules:
            if module.layer is not None and layer_count and module.layer >= layer_count:
                raise AdapterError(f"{name} changes layer {module.layer}, but {self._model_name} has {layer_count} layers.",
                                   "Attach the adapter to the model it was trained on.")  # fmt: skip
            shape = linear_shape(named[module.module]) if module.module in named else None
            if shape is None:
                raise AdapterError(f"{name} changes {module.module}, which {self._model_name} has no linear layer for: it is for another architecture.",
                                   "Attach the adapter to the model it was trained on.")  # fmt: skip
            if shape != (module.in_features, module.out_features):
                raise AdapterError(f"{name} changes {module.module} as {module.in_features} → {module.out_features} features, but in "
                                   f"{self._model_name} it is {shape[0]} → {shape[1]}: the adapter is for a model of another size.",
                                   "Attach the adapter to the model it was trained on.")  # fmt: skip


def _array(adapter: MLXAdapter, entry: Any) -> mx.array:
    return mx.array(read_float_tensor(adapter.weights, entry).reshape(entry.shape))
