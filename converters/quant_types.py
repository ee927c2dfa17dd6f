"""The GGUF quantization types pocketlm offers, with llama.cpp's figures for them. No engine is imported here, so
the CLI's help and the app's choices can list them at once."""

from __future__ import annotations

from dataclasses import dataclass

from pocketlm.converters.base import ConversionError


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama.cpp's llama_ftype
    bits_per_weight: float  # llama.cpp's quantize tool states these for a 7B Llama; sizes scale with them
    quality: str


# From llama.cpp's `llama-quantize --help` and its README's perplexity table (Llama-3-8B): a note users can act on.
QUANT_TYPES = {q.name: q for q in (
    QuantType("Q8_0", 7, 8.50, "practically lossless"),
    QuantType("Q6_K", 18, 6.56, "near lossless"),
    QuantType("Q5_K_M", 17, 5.70, "very small loss, recommended if it fits"),
    QuantType("Q5_K_S", 16, 5.54, "very small loss"),
    QuantType("Q5_1", 9, 6.00, "small loss (legacy format)"),
    QuantType("Q5_0", 8, 5.50, "small loss (legacy format)"),
    QuantType("Q4_K_M", 15, 4.89, "balanced: the usual choice"),
    QuantType("Q4_K_S", 14, 4.58, "slightly worse than Q4_K_M, smaller"),
    QuantType("IQ4_XS", 30, 4.25, "close to Q4_K_S, smaller; best with an importance matrix"),
    QuantType("IQ4_NL", 25, 4.50, "4-bit non-linear, good on CPUs"),
    QuantType("Q4_1", 3, 5.00, "legacy 4-bit"),
    QuantType("Q4_0", 2, 4.50, "legacy 4-bit, fastest on some ARM CPUs"),
    QuantType("Q3_K_L", 13, 4.27, "noticeable loss"),
    QuantType("Q3_K_M", 12, 3.91, "noticeable loss"),
    QuantType("Q3_K_S", 11, 3.50, "large loss"),
    QuantType("Q2_K", 10, 2.96, "very large loss; for the biggest models only"),
)}  # fmt: skip

UNQUANTIZED_TYPES = {"ALL_F32", "F16", "BF16"}  # what quantizing starts from (GGUF file types)


def quant_type(name: str) -> QuantType:
    try:
        return QUANT_TYPES[name.upper()]
    except KeyError:
        raise ConversionError(f"{name!r} is not a quantization pocketlm knows.", f"Choose one of {', '.join(QUANT_TYPES)}.") from None


def expected_size(source_parameters: int, quant: QuantType) -> int:
    return int(source_parameters * quant.bits_per_weight / 8)
