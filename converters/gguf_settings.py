"""The GGUF converters' own options: the type written from a checkpoint, and the quantization after it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy stays unimported until an importance matrix is computed or read
    from pocketlm.converters.importance_matrix import ImportanceMatrix

OUTTYPE_CHOICES = ("auto", "f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GGUFSettings:
    outtype: str = "auto"  # the GGUF written from a checkpoint: f32, f16, bf16, q8_0; auto: bf16 for bf16 weights, else f16
    quant: str | None = None  # then quantized to this (Q4_K_M, IQ4_XS, ...)
    imatrix: str | None = None  # a calibration text file, "builtin", or a llama-imatrix GGUF file
    importance_matrix: ImportanceMatrix | None = field(default=None, compare=False, repr=False)  # computed from `imatrix`
