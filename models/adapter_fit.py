"""Does a LoRA adapter fit a base model? Checked from file headers before any backend loads either.

An adapter trained on another model fails late and obscurely otherwise: PEFT raises a size-mismatch traceback, and
llama.cpp returns NULL with a log line. Here every module the adapter changes is looked up in the base — its decoder
layer, its presence, its input and output widths — and the first difference is said in one sentence.

The base may be a Hugging Face safetensors folder, a GPTQ folder (qweight packs 32/bits input rows per int32), an MLX
folder (a quantized weight packs 32/bits input columns per uint32) or a GGUF file, whose tensors are found through
gguf's own HF → GGUF name table, with shapes in ggml order: (in, out).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.models.adapter_files import LAYER, AdapterError
from pocketlm.models.formats import ADAPTER_FORMATS, ModelFacts, ModelFormat, inspect_model
from pocketlm.models.gguf_info import read_gguf_header
from pocketlm.models.mlx_adapter import MLXAdapter
from pocketlm.models.peft_adapter import PeftAdapter
from pocketlm.models.safetensors_header import TensorEntry, read_safetensors_header

# An adapter on lm_head of a model with tied embeddings changes the embedding matrix's transpose's user: the base
# has no lm_head weight of its own, and the embedding (vocab × hidden) has lm_head's (out × in) shape.
_TIED_OUTPUT = {"lm_head": "model.embed_tokens"}
_GGUF_TIED_OUTPUT = {"output.weight": "token_embd.weight"}
# gguf's name table maps a fused HF projection onto the GGUF tensor llama.cpp keeps it in (Phi-3's gate_up_proj in
# ffn_up) for every architecture; a base that also has the other half (ffn_gate) keeps them apart, so lacks the fused one.
_FUSED_INTO = {"gate_up_proj": ("ffn_up", "ffn_gate")}

ShapeOf = Callable[[str], "tuple[int, int] | None"]  # a module path → its (in, out) in the base, None when absent
_NOT_A_BASE_HINT = "Attach the adapter to a model: `pocketlm ls` lists them."


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must match in a base model, read from its file headers (every part of a split GGUF): the one
    reading of a base that the fit check and the adapter converters share."""

    label: str
    facts: ModelFacts
    layer_count: int  # 0 when unknown
    shape_of: ShapeOf
    tensor_names: frozenset[str]  # the weights as stored: GGUF names in a GGUF, transformers names in a folder
    metadata: Mapping[str, object] = field(default_factory=dict)  # a GGUF's metadata (every part); a folder's config.json


def check_adapter_fits(adapter: PeftAdapter | MLXAdapter, base_path: Path, base_name: str = "") -> None:
    """Refuse, with a sentence naming what differs, an adapter whose modules the base at `base_path` lacks or has
    in other sizes (another architecture, layer count or hidden size)."""
    check_fits(adapter, read_base_shapes(base_path, base_name))


def read_base_shapes(base_path: Path, base_name: str = "", facts: ModelFacts | None = None) -> BaseShapes:
    """The layer count and module shapes of the model at `base_path` (`facts`: its inspect_model, when read already);
    an adapter, or a format whose weights cannot be read from headers, is refused with a sentence."""
    base_path = Path(base_path)
    label = base_name or base_path.name
    if facts is None:
        try:
            facts = inspect_model(base_path)
        except AdapterError:
            raise AdapterError(f"{label} is itself an adapter, not a model an adapter can be attached to.", _NOT_A_BASE_HINT) from None
    if facts.format in ADAPTER_FORMATS:
        raise AdapterError(f"{label} is itself an adapter, not a model an adapter can be attached to.", _NOT_A_BASE_HINT)
    return _base_shapes(facts, base_path, label)


def check_fits(adapter: PeftAdapter | MLXAdapter, base: BaseShapes) -> None:
    """check_adapter_fits against a base already read."""
    label, layer_count, shape_of = base.label, base.layer_count, base.shape_of
    name = adapter.folder.name
    trained_on = f" (its base is {adapter.base_model})" if adapter.base_model else ""
    hint = f"Attach it to {adapter.base_model}, or use an adapter trained on {label}." if adapter.base_model else f"Use an adapter trained on {label}."
    deepest = max(adapter.layers, default=-1)
    if layer_count and deepest >= layer_count:
        raise AdapterError(f"{name} changes layer {deepest}, but {label} has only {layer_count} layers: it was trained on another model{trained_on}.", hint)
    for module in adapter.modules:
        shape = shape_of(module.module)
        if shape is None:
            raise AdapterError(f"{name} changes {module.module}, which {label} does not have: it was trained on another kind of model{trained_on}.", hint)
        in_features, out_features = shape
        if module.in_features != in_features:
            raise AdapterError(f"{name}'s {module.short_name} takes {module.in_features} inputs but {label}'s takes {in_features}: "
                               f"it was trained on a model of another size{trained_on}.", hint)  # fmt: skip
        if module.out_features != out_features:
            raise AdapterError(f"{name}'s {module.short_name} gives {module.out_features} outputs but {label}'s gives {out_features}: "
                               f"it was trained on a model of another size{trained_on}.", hint)  # fmt: skip


def _base_shapes(facts: ModelFacts, base_path: Path, label: str) -> BaseShapes:
    if facts.format == ModelFormat.GGUF:
        return _gguf_shapes(facts, label)
    if facts.format not in (ModelFormat.SAFETENSORS, ModelFormat.GPTQ, ModelFormat.MLX):
        raise AdapterError(f"{label} is a {facts.format} model, whose weights pocketlm cannot check an adapter against.",
                           "Attach the adapter to a safetensors, GPTQ, MLX or GGUF model.")  # fmt: skip
    entries: dict[str, TensorEntry] = {}
    for file in facts.files:
        if file.suffix == ".safetensors":
            entries.update((entry.name, entry) for entry in read_safetensors_header(file).tensors)
    config = _config(base_path)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    layer_count = config.get("num_hidden_layers") or text_config.get("num_hidden_layers") or _counted_layers(entries)
    gptq_bits = facts.gptq.bits if facts.gptq else 0
    quantization = config.get("quantization") if facts.format == ModelFormat.MLX and isinstance(config.get("quantization"), dict) else {}

    def shape_of(module: str) -> tuple[int, int] | None:
        module = module if _has(entries, module) else _TIED_OUTPUT.get(module, module)
        if gptq_bits and (packed := entries.get(f"{module}.qweight")):
            rows, out_features = packed.shape  # GPTQ: (in · bits / 32, out) int32
            return rows * 32 // gptq_bits, out_features
        weight = entries.get(f"{module}.weight")
        if weight is None or len(weight.shape) != 2:
            return None
        out_features, columns = weight.shape
        if quantization and weight.dtype == "U32":  # MLX: (out, in · bits / 32) uint32, bits per layer or the default
            layer = quantization.get(module)
            bits = layer.get("bits", quantization.get("bits", 4)) if isinstance(layer, dict) else quantization.get("bits", 4)
            return columns * 32 // int(bits), out_features
        return columns, out_features

    return BaseShapes(label, facts, int(layer_count), shape_of, frozenset(entries), config)


def _has(entries: dict[str, TensorEntry], module: str) -> bool:
    return f"{module}.weight" in entries or f"{module}.qweight" in entries


def _counted_layers(entries: dict[str, TensorEntry]) -> int:
    layers = {int(match[1]) for name in entries if (match := LAYER.search(name))}
    return max(layers) + 1 if layers else 0


def _config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}  # inspect_model has read it already; a folder without one has no layer count to compare
    return config if isinstance(config, dict) else {}


def _gguf_shapes(facts: ModelFacts, label: str) -> BaseShapes:
    import gguf  # imports numpy: only when an adapter is checked, never at `pocketlm --help`

    tensors: dict[str, tuple[int, ...]] = {}
    metadata: dict[str, object] = {}
    for part in facts.files:  # a split GGUF's tensors are spread over its parts
        header = read_gguf_header(part)
        metadata.update(header.metadata)
        tensors.update((tensor.name, tensor.shape) for tensor in header.tensors)
    architecture = str(metadata.get("general.architecture", "unknown"))
    block_count = metadata.get(f"{architecture}.block_count")
    layer_count = block_count if isinstance(block_count, int) else 0
    arch = {name: member for member, name in gguf.MODEL_ARCH_NAMES.items()}.get(architecture)
    if arch is None:
        raise AdapterError(f"{label} is a GGUF of architecture {architecture!r}, whose tensor names pocketlm does not know.",
                           "Attach the adapter to the model's safetensors checkpoint instead.")  # fmt: skip
    name_map = gguf.get_tensor_name_map(arch, layer_count)

    def shape_of(module: str) -> tuple[int, int] | None:
        name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            return None
        fused, apart = _FUSED_INTO.get(module.rsplit(".", 1)[-1], ("", ""))
        if fused and name.replace(fused, apart) in tensors:
            return None
        shape = tensors.get(name) or tensors.get(_GGUF_TIED_OUTPUT.get(name, ""))
        if shape is None or len(shape) != 2:
            return None
        in_features, out_features = shape  # ggml order: the row length (the input width) first
        return in_features, out_features

    return BaseShapes(label, facts, layer_count, shape_of, frozenset(tensors), metadata)

