"""The options of the adapter converters (PEFT LoRA → GGUF LoRA, PEFT LoRA → mlx-lm adapter)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADAPTER_OUTTYPES = ("auto", "f32", "f16", "bf16")  # auto: f32 for an f32-trained adapter, else f16 (adapters are small)


@dataclass(frozen=True)
class AdapterConversionSettings:
    # The base model the output is for: a GGUF file or a model folder. An adapter's tensors follow the base's names
    # (and, for a GGUF, the q/k row order its converter wrote), so every adapter conversion needs it.
    base: Path | None = None
    outtype: str = "auto"  # GGUF LoRA only; mlx-lm adapters are written in float32 (MLX casts on load)
