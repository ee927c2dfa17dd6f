"""Will a model fit in this machine's memory? An estimate, so a load that would swap or be killed is refused first."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
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
    memory_name: str = "memory"  # where it must fit: "memory", or "GPU memory on cuda:0"

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


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def checkpoint_kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """Keys and values of every layer for one token, from a transformers config.json (0 when it says too little)."""
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def count(key: str, default: int = 0) -> int:
        value = config.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    layers, heads, width = count("num_hidden_layers"), count("num_attention_heads"), count("hidden_size")
    if not (layers and heads and width):
        return 0
    return layers * count("num_key_value_heads", heads) * count("head_dim", width // heads) * 2 * dtype_bytes


def estimate_torch_memory(config: dict, weights_bytes: int, dtype_bytes: int, context_length: int, device: str) -> MemoryEstimate:
    """PyTorch: the weights as loaded (parameters x dtype, or a GPTQ checkpoint's size), a `dtype` KV cache for
    `context_length` tokens, and the runtime's buffers, against the free memory of `device` ("cpu", "cuda:0")."""
    if device.startswith("cuda"):
        import torch

        available, _ = torch.cuda.mem_get_info(torch.device(device))
        memory_name = f"GPU memory on {device}"
    else:
        available, memory_name = psutil.virtual_memory().available, "memory"
    return MemoryEstimate(
        weights_bytes=weights_bytes,
        kv_cache_bytes=checkpoint_kv_bytes_per_token(config, dtype_bytes) * context_length,
        overhead_bytes=_RUNTIME_OVERHEAD_BYTES + int(weights_bytes * _WEIGHT_OVERHEAD_FRACTION),
        available_bytes=int(available),
        context_length=context_length,
        memory_name=memory_name,
    )


@lru_cache(maxsize=1)
def torch_default_placement() -> tuple[str, str]:
    """The device and dtype the PyTorch backend loads on when not told: ("cuda:0", "bfloat16" or "float16") where
    torch sees a CUDA device, else ("cpu", "float32") (float16 matmuls on a CPU are many times slower).

    Imports torch (seconds, once), so only asked about checkpoints; cached because the Models screen asks per row and
    the answer (driver, device, bf16 support) does not change while the process runs."""
    from importlib.util import find_spec

    if find_spec("torch") is None:
        return "cpu", "float32"
    import torch

    if not torch.cuda.is_available():
        return "cpu", "float32"
    return "cuda:0", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _checkpoint_config(folder: Path) -> dict:
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def estimate_model_memory(model: LocalModel, context_length: int = DEFAULT_CONTEXT_LENGTH) -> MemoryEstimate:
    """The estimate for a stored model at the context a chat would open it with (capped at what it was trained for):
    a GGUF as llama.cpp maps it, in RAM; a checkpoint at the device and dtype the PyTorch backend picks by default
    (bf16/f16 against a CUDA device's free memory, else float32 in RAM)."""
    from pocketlm.models.gguf_info import read_gguf

    context = min(context_length, model.context_length) if model.context_length else context_length
    if model.format in ("safetensors", "gptq") and model.path.is_dir():
        device, dtype = torch_default_placement()
        # A float checkpoint loads at that dtype whatever it was stored in; a GPTQ one keeps its packed weights.
        floats = model.format == "safetensors" and model.parameter_count
        weights = model.parameter_count * DTYPE_BYTES[dtype] if floats else model.size_bytes
        return estimate_torch_memory(_checkpoint_config(model.path), weights, DTYPE_BYTES[dtype], context, device)
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
        f"context cache {gib(estimate.kv_cache_bytes)}) but only {gib(estimate.available_bytes)} of {estimate.memory_name} is free.",
        "Use a smaller context (--ctx), a smaller quantization, or --force to try anyway.",
    )


def human_bytes(n_bytes: int) -> str:
    """Decimal units, as the Hub shows file sizes: 98.4 MB, 4.92 GB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{n_bytes} B"
