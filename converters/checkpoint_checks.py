"""A checkpoint's hyperparameters and tensors, checked before a converter writes anything.

A damaged or hand-edited config.json must end in one sentence, not a ZeroDivisionError, a loop over a billion layers
or a GGUF llama.cpp later aborts on. The bounds are far beyond any real model and far below what would hang pocketlm.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pocketlm.converters.base import ConversionError
from pocketlm.converters.gguf_architectures import Architecture, Config, setting

MAX_LAYERS = 1024  # the largest released models have under 200
MAX_VOCABULARY = 2**24  # GGUF token ids are int32 in llama.cpp; real vocabularies stay under 2**18
MAX_WIDTH = 2**20  # hidden and feed-forward sizes (the largest today are about 2**16)
MAX_HEADS = 2**12
MAX_CONTEXT = 2**24

_DAMAGED = "The checkpoint's config.json is damaged or does not belong to these weights; fix it or download the checkpoint again."
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Hyperparameters:
    """The sizes the GGUF header states and the tensors must agree with."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dims: int  # how much of each head RoPE turns (Phi-3's partial_rotary_factor)
    vocab_size: int
    context_length: int
    explicit_head_dim: bool  # config.json (or the architecture's default) says how wide a head is


def _count(config: Config, key: str, low: int, high: int, default: int | None = None) -> int:
    value = setting(config, key)
    if value is None and default is not None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if value is None or isinstance(value, bool) or not whole:
        raise ConversionError(f"config.json has no usable {key!r}, which the conversion needs.", "Check that the checkpoint is complete.")
    number = int(value)  # type: ignore[arg-type]
    if not low <= number <= high:
        raise ConversionError(f"config.json says {key} is {number}; pocketlm converts models whose {key} is {low} to {high}.", _DAMAGED)
    return number


def read_hyperparameters(config: Config, architecture: Architecture) -> Hyperparameters:
    """The checkpoint's sizes, each within bounds and consistent with the others, or a ConversionError."""
    hidden = _count(config, "hidden_size", 1, MAX_WIDTH)
    heads = _count(config, "num_attention_heads", 1, MAX_HEADS)
    kv_heads = _count(config, "num_key_value_heads", 1, MAX_HEADS, default=heads)
    if heads % kv_heads:
        raise ConversionError(f"config.json's num_key_value_heads ({kv_heads}) does not divide num_attention_heads ({heads}): "
                              "each key/value head must serve the same number of query heads.", _DAMAGED)  # fmt: skip
    explicit = setting(config, "head_dim") is not None or architecture.default_head_dim is not None
    head_dim = _count(config, "head_dim", 1, MAX_WIDTH, default=architecture.default_head_dim or hidden // heads)
    if not explicit and hidden % heads:
        raise ConversionError(f"config.json's num_attention_heads ({heads}) does not divide hidden_size ({hidden}), "
                              "and no head_dim says how wide each head is.", _DAMAGED)  # fmt: skip
    fraction = setting(config, "partial_rotary_factor", 1.0)
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ConversionError(f"config.json's partial_rotary_factor ({fraction!r}) is not a fraction between 0 and 1.", _DAMAGED)
    rotary_dims = int(head_dim * fraction)
    if rotary_dims % 2:
        raise ConversionError(f"RoPE turns dimensions in pairs, and config.json makes each head rotate {rotary_dims} of them.", _DAMAGED)
    return Hyperparameters(
        hidden_size=hidden, intermediate_size=_count(config, "intermediate_size", 1, MAX_WIDTH),
        layers=_count(config, "num_hidden_layers", 1, MAX_LAYERS), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        rotary_dims=rotary_dims, vocab_size=_count(config, "vocab_size", 1, MAX_VOCABULARY),
        context_length=_count(config, "max_position_embeddings", 1, MAX_CONTEXT, default=2048), explicit_head_dim=explicit,
    )  # fmt: skip


# The first dimension each tensor of this name must have, whatever the architecture (transformers names them alike).
# Fused projections (Phi-3's qkv_proj) hold the three side by side.
_ROWS: dict[str, tuple[str, Callable[[Hyperparameters], int]]] = {
    "embed_tokens.weight": ("vocab_size", lambda h: h.vocab_size),
    "lm_head.weight": ("vocab_size", lambda h: h.vocab_size),
    "self_attn.q_proj.weight": ("num_attention_heads × head_dim", lambda h: h.heads * h.head_dim),
    "self_attn.k_proj.weight": ("num_key_value_heads × head_dim", lambda h: h.kv_heads * h.head_dim),
    "self_attn.v_proj.weight": ("num_key_value_heads × head_dim", lambda h: h.kv_heads * h.head_dim),
    "self_attn.qkv_proj.weight": ("(num_attention_heads + 2 × num_key_value_heads) × head_dim", lambda h: (h.heads + 2 * h.kv_heads) * h.head_dim),
}  # fmt: skip


def check_tensors(sizes: Hyperparameters, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """The tensors (name, shape) agree with config.json: as many layers, the vocabulary's rows, the heads' widths."""
    layers: set[int] = set()
    embedding = False
    for name, shape in shapes:
        if match := _LAYER.search(name):
            layers.add(int(match[1]))
        suffix = next((s for s in _ROWS if name == s or name.endswith("." + s)), None)
        if suffix is None:
            continue
        embedding = embedding or suffix == "embed_tokens.weight"
        what, rows = _ROWS[suffix]
        if not shape or shape[0] != rows(sizes):
            raise ConversionError(f"{name} has {shape[0] if shape else 0} rows, but config.json's {what} makes {rows(sizes)}.", _DAMAGED)
    if not embedding:
        raise ConversionError("The checkpoint's weights hold no token embedding (embed_tokens.weight).", "Check that every weight file is there.")
    if layers != set(range(sizes.layers)):
        held = f"{len(layers)} (numbered {min(layers)} to {max(layers)})" if layers else "none"
        raise ConversionError(f"config.json says the model has {sizes.layers} layers, but the weights hold {held}.", _DAMAGED)
