"""What PEFT's and mlx-lm's adapter folders have in common: an `adapter_config.json`, LoRA matrices in pairs in one
safetensors file, and modules that belong to a decoder layer. Each format's reader (peft_adapter, mlx_adapter) adds
its own names, layouts and scales; the refusals shared by both are said here once."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from pocketlm.models.errors import PocketError
from pocketlm.models.safetensors_header import TensorEntry

ADAPTER_CONFIG = "adapter_config.json"
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})
# The decoder layer a module belongs to: model.layers.N (Llama, Qwen, Gemma, Phi-3), transformer.h.N, ...blocks.N.
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class AdapterError(PocketError):
    """An adapter is damaged, of a kind pocketlm cannot apply, or does not fit the model it is attached to."""


def layer_of(module: str) -> int | None:
    """The decoder layer `module` is in; None outside the layers (lm_head)."""
    match = LAYER.search(module)
    return int(match[1]) if match else None


def short_name(module: str) -> str:
    """The module's name inside its layer: "self_attn.q_proj" (what mlx-lm calls a LoRA key)."""
    match = LAYER.search(module)
    return module[match.end() :] if match else module


def read_adapter_config(folder: Path, kind: str, missing_hint: str, hint: str) -> dict:
    """`folder`'s adapter_config.json as a dict; refused with a sentence when missing or not a JSON object. `kind` names
    the format ("a PEFT adapter"), `missing_hint` what folder to give instead, `hint` where a good copy comes from."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG}, so it is not {kind}.", missing_hint) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise AdapterError(f"{path} cannot be read as JSON ({error}).", hint) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} is not a JSON object.", hint)
    return config


def lora_pairs(entries: tuple[TensorEntry, ...], tensor_name: re.Pattern[str], spelling: tuple[str, str], folder: Path,
               weights_name: str, hint: str, stranger: Callable[[TensorEntry], AdapterError]) -> dict[str, tuple[TensorEntry, TensorEntry]]:  # fmt: skip
    """Module path → its (A, B) entries, sorted by path. `tensor_name` has groups `module` and `which` (a/A or b/B),
    `spelling` is how the format names the two ("lora_A", "lora_B"); a tensor `tensor_name` does not match is refused
    with `stranger(entry)`'s error, and so are matrices that are not 2-D floats, a module with only one of its two,
    and a file with none."""
    pairs: dict[str, dict[str, TensorEntry]] = {}
    for entry in entries:
        match = tensor_name.match(entry.name)
        if not match:
            raise stranger(entry)
        if entry.dtype not in FLOAT_DTYPES or len(entry.shape) != 2:
            raise AdapterError(f"{folder.name}'s {entry.name} is {entry.dtype} {list(entry.shape)}; LoRA matrices are 2-D F32, F16 or BF16.", hint)
        pairs.setdefault(match["module"], {})[match["which"].lower()] = entry
    if not pairs:
        raise AdapterError(f"{folder.name}'s {weights_name} holds no LoRA weights.", hint)
    complete: dict[str, tuple[TensorEntry, TensorEntry]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"a", "b"}:
            missing = spelling[1] if "a" in pair else spelling[0]
            raise AdapterError(f"{folder.name} has no {missing} for {module}: the adapter is incomplete.", hint)
        complete[module] = (pair["a"], pair["b"])
    return complete


def dominant_dtype(entries: tuple[TensorEntry, ...]) -> str:
    """The stored tensors' type: "F32" if any is, else the first of the others."""
    dtypes = {entry.dtype for entry in entries}
    return "F32" if "F32" in dtypes else sorted(dtypes)[0]
