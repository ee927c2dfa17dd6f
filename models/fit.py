"""Will a model fit in this machine's memory? An estimate, so a load that would swap or be killed is refused first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from pocketlm.models.errors import NotEnoughMemory
from pocketlm.models.gguf_info import GGUFSummary

if TYPE_CHECKING:
    from pocketlm.models.store import LocalModel

# llama.cpp's compute buffers and the runtime's own footprint: measured at a few hundred MiB for small models,
# growing with width; this errs on the side of a load that succeeds.
_RUNTIME_OVERHEAD_BYTES = 256 * 2**20
_WEIGHT_OVERHEAD_FRACTION = 0.05
# What a chat opens a model with unless told otherwise (capped at the model's trained context).
DEFAULT_CONTEXT_LENGTH = 4096


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    available_bytes: int
    context_length: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes


def physical_cores() -> int:
    """Cores without their hyperthreads: what llama.cpp-style engines decode fastest on."""
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def estimate_gguf_memory(summary: GGUFSummary, context_length: int) -> MemoryEstimate:
    """Weights (mapped whole), an f16 KV cache for `context_length` tokens, and the runtime's buffers."""
    return MemoryEstimate(
        weights_bytes=summary.file_size,
        kv_cache_bytes=summary.kv_bytes_per_token * context_length,
        overhead_bytes=_RUNTIME_OVERHEAD_BYTES + int(summary.file_size * _WEIGHT_OVERHEAD_FRACTION),
        available_bytes=int(psutil.virtual_memory().available),
    )


def estimate_model_memory(model: LocalModel, context_length: int = DEFAULT_CONTEXT_LENGTH) -> MemoryEstimate:
    """The estimate for a stored model at the context a chat would open it with (capped at what it was trained for)."""
    from pocketlm.models.gguf_info import read_gguf

    context = min(context_length, model.context_length) if model.context_length else context_length
    kv_per_token = read_gguf(model.path).kv_bytes_per_token if model.format == "gguf" else 0
    return MemoryEstimate(
        weights_bytes=model.size_bytes,
        kv_cache_bytes=kv_per_token * context,
        overhead_bytes=_RUNTIME_OVERHEAD_BYTES + int(model.size_bytes * _WEIGHT_OVERHEAD_FRACTION),
        available_bytes=int(psutil.virtual_memory().available),
        context_length=context,
    )


def require_fit(estimate: MemoryEstimate, model_name: str) -> None:
    """Refuse, with the numbers, a load the estimate says will not fit."""
    if estimate.fits:
        return
    raise NotEnoughMemory(
        f"{model_name} needs about {gib(estimate.total_bytes)} (weights {gib(estimate.weights_bytes)}, "
        f"context cache {gib(estimate.kv_cache_bytes)}) but only {gib(estimate.available_bytes)} of memory is free.",
        "Use a smaller context (--ctx), a smaller quantization, or --force to try anyway.",
    )


def human_bytes(n_bytes: int) -> str:
    """Decimal units, as the Hub shows file sizes: 98.4 MB, 4.92 GB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{n_bytes} B"
