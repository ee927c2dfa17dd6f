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
    if isinstance(parameters, dict) and isinstance(parameters.get("full_attention"), dict):
        parameters = parameters["full_attention"]  # per layer type (Gemma 3): the global layers' settings lead
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
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        heads = int(setting(config, "num_attention_heads"))  # type: ignore[arg-type]
    elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        heads = int(setting(config, "num_key_value_heads") or setting(config, "num_attention_heads"))  # type: ignore[arg-type]
    else:
        return data
    rows = data.shape[0]
    if rows % (2 * heads):
        from pocketlm.converters.base import ConversionError

        raise ConversionError(f"{name} has {rows} rows, which {heads} heads cannot split; config.json's head counts do not match the weights.")
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def keep(name: str, data: np.ndarray, config: Config) -> np.ndarray:
    return data


def gemma_norms(name: str, data: np.ndarray, config: Config) -> np.ndarray:
    """Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight, so the 1 moves into the stored weights."""
    return data + 1.0 if name.endswith("norm.weight") else data


def no_metadata(writer: object, config: Config) -> None:
    pass


def gemma2_metadata(writer: object, config: Config) -> None:
    w = writer
    if (softcap := setting(config, "attn_logit_softcapping")) is not None:
        w.add_attn_logit_softcapping(float(softcap))  # type: ignore[attr-defined, arg-type]
    if (softcap := setting(config, "final_logit_softcapping")) is not None:
        w.add_final_logit_softcapping(float(softcap))  # type: ignore[attr-defined, arg-type]
    if (window := setting(config, "sliding_window")) is not None:
        w.add_sliding_window(int(window))  # type: ignore[attr-defined, arg-type]


def gemma3_metadata(writer: object, config: Config) -> None:
    """Gemma 3 alternates sliding-window layers (their own RoPE base) with global ones."""
    w = writer
    parameters = setting(config, "rope_parameters")
    local = parameters.get("sliding_attention") if isinstance(parameters, dict) else None
    local_base = (local or {}).get("rope_theta") if isinstance(local, dict) else setting(config, "rope_local_base_freq")
    if local_base is not None:
        w.add_rope_freq_base_swa(float(local_base))  # type: ignore[attr-defined]
    if (window := setting(config, "sliding_window")) is not None:
        w.add_sliding_window(int(window))  # type: ignore[attr-defined, arg-type]
    layer_types = setting(config, "layer_types")
    if isinstance(layer_types, list):
        w.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])  # type: ignore[attr-defined]
    elif (pattern := setting(config, "sliding_window_pattern")) is not None:
        w.add_sliding_window_pattern(int(pattern))  # type: ignore[attr-defined, arg-type]
    if (softcap := setting(config, "final_logit_softcapping")) is not None:
        w.add_final_logit_softcapping(float(softcap))  # type: ignore[attr-defined, arg-type]


def phi3_metadata(writer: object, config: Config) -> None:
    original = setting(config, "original_max_position_embeddings")
    if original is not None:
        writer.add_rope_scaling_orig_ctx_len(int(original))  # type: ignore[attr-defined, arg-type]
    writer.add_sliding_window(int(setting(config, "sliding_window") or 0))  # type: ignore[attr-defined, arg-type]


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # a gguf.MODEL_ARCH member name
    transform: TensorTransform = keep
    metadata: Callable[[object, Config], None] = no_metadata  # keys beyond the shared ones
    drops_output: bool = False  # the output projection is always the token embedding (Gemma)
    # How wide a head is when config.json leaves head_dim out: transformers' config default for architectures whose
    # heads are not hidden_size / num_attention_heads wide (None: that quotient, which then must be whole).
    default_head_dim: int | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LLAMA", undo_rotary_permutation),  # Llama 2/3, SmolLM, TinyLlama
    "MistralForCausalLM": Architecture("LLAMA", undo_rotary_permutation),
    "Qwen2ForCausalLM": Architecture("QWEN2"),
    "Qwen3ForCausalLM": Architecture("QWEN3", default_head_dim=128),
    "Gemma2ForCausalLM": Architecture("GEMMA2", gemma_norms, gemma2_metadata, drops_output=True, default_head_dim=256),
    "Gemma3ForCausalLM": Architecture("GEMMA3", gemma_norms, gemma3_metadata, drops_output=True, default_head_dim=256),  # text-only (1B; 4B+ text part)
    # Fused qkv_proj and gate_up_proj are kept fused: llama.cpp's Phi-3 graph splits them itself.
    "Phi3ForCausalLM": Architecture("PHI3", metadata=phi3_metadata),
}


def supported_names() -> str:
    return ", ".join(sorted(ARCHITECTURES))
