"""The Hugging Face architectures the GGUF converter knows, one entry each: GGUF arch, hyperparameters, tensor fixes.

Adding an architecture is adding an entry to ARCHITECTURES (and, if its tensors need more than renaming, a small
transform function here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Config = dict[str, object]
TensorTransform = Callable[[str, np.ndarray, Config], np.ndarray]


def setting(config: Config, key: str, default: object = None) -> object:
    """A hyperparameter from the config, or from its `text_config` (multimodal wrappers keep the LLM's there)."""
    if key in config and config[key] is not None:
        return config[key]
    text = config.get("text_config")
    if isinstance(text, dict) and text.get(key) is not None:
        return text[key]
    return default


def rope_settings(config: Config) -> dict[str, object]:
    """RoPE settings from either layout: transformers <5 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    parameters = setting(config, "rope_parameters")
    merged: dict[str, object] = dict(parameters) if isinstance(parameters, dict) else {}
    scaling = setting(config, "rope_scaling")
    if isinstance(scaling, dict):
        merged = {**scaling, **merged}
    if "rope_theta" not in merged and setting(config, "rope_theta") is not None:
        merged["rope_theta"] = setting(config, "rope_theta")
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    merged["rope_type"] = rope_type
    return merged


def head_dim(config: Config) -> int:
    return int(setting(config, "head_dim") or int(setting(config, "hidden_size")) // int(setting(config, "num_attention_heads")))  # type: ignore[arg-type]


def llama3_rope_factors(config: Config) -> np.ndarray:
    """Per-frequency scale factors of Llama 3.1's RoPE scaling, which llama.cpp reads from a `rope_freqs` tensor."""
    rope = rope_settings(config)
    base, dim = float(rope.get("rope_theta", 10000.0)), head_dim(config)  # type: ignore[arg-type]
    factor = float(rope.get("factor", 8.0))  # type: ignore[arg-type]
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))  # type: ignore[arg-type]
    original = float(rope.get("original_max_position_embeddings", 8192))  # type: ignore[arg-type]
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for frequency in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / frequency
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def undo_rotary_permutation(name: str, data: np.ndarray, config: Config) -> np.ndarray:
    """Llama-family q/k projections: Hugging Face splits each head's rotary pairs into halves; llama.cpp wants them
    interleaved, as in Meta's original weights. Each head's rows go from [x0..x(d/2-1), y0..] back to [x0, y0, x1, ...]."""
    if name.endswith("self_attn.q_proj.weight"):
        heads = int(setting(config, "num_attention_heads"))  # type: ignore[arg-type]
    elif name.endswith("self_attn.k_proj.weight"):
        heads = int(setting(config, "num_key_value_heads") or setting(config, "num_attention_heads"))  # type: ignore[arg-type]
    else:
        return data
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def keep(name: str, data: np.ndarray, config: Config) -> np.ndarray:
    return data


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # a gguf.MODEL_ARCH member name
    transform: TensorTransform = keep
    writes_rope_dimension: bool = True


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LLAMA", undo_rotary_permutation),  # Llama 2/3, SmolLM, TinyLlama
    "MistralForCausalLM": Architecture("LLAMA", undo_rotary_permutation),
    "Qwen2ForCausalLM": Architecture("QWEN2"),
    "Qwen3ForCausalLM": Architecture("QWEN3"),
}


def supported_names() -> str:
    return ", ".join(sorted(ARCHITECTURES))
