"""Is a stored model's quantization label a plain float type? Verify holds a float conversion to rounding's level,
a quantization only to what quantizing costs."""

from __future__ import annotations

# The labels the store keeps for unquantized weights: GGUF file types (gguf_info: LlamaFileType names), safetensors
# dtypes (a checkpoint's or an MLX folder's dominant one) and torch's names. Quantized labels ("Q4_K_M", "4-bit g64",
# GPTQ's "4-bit g128") and "unknown" are not in it.
FLOAT_LABELS = frozenset({"ALL_F32", "F64", "F32", "F16", "BF16", "FLOAT64", "FLOAT32", "FLOAT16", "BFLOAT16"})


def is_float_type(quantization: str) -> bool:
    """Whether `quantization` (LocalModel.quantization) names float weights: F32, F16, BF16 and the like."""
    return quantization.strip().upper() in FLOAT_LABELS
