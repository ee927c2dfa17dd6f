"""Hugging Face checkpoint → GPTQ checkpoint (2, 4 or 8 bits), quantized here in PyTorch and saved in the standard
format transformers (through optimum + gptqmodel), GPTQModel and vLLM load.

Why our own GPTQ rather than GPTQModel's: on the 2-core CPU this project targets, GPTQModel 7.6 in float32 takes
55–110 s for the 135M test model; this walk does the same sequential, layer-by-layer algorithm (with GPTQModel's
default group-aware column order and damping) with less around it: linears that share an input are solved as one
matrix with one Cholesky factorisation, each calibration pass stops as soon as the linears it measures have seen
their input and replays the outputs of the linears already quantized instead of recomputing them, the layer passes
use every physical core and the column loop one thread over contiguous rows. benchmarks/gptq_speed.py measures both.

The walk (converters/gptq_walk.py): embeddings run once per calibration chunk to capture what the first decoder layer receives (and what every
layer is called with: masks, rotary embeddings); then, layer by layer, each group of linears reading the same input
(q/k/v, then o, then gate/up, then down: "true sequential") gets its Hessian from inputs that already went through
the quantized linears before it, is quantized, and its weights are replaced by their dequantized values; the layer
then runs once more to give the next layer its inputs. Embeddings, norms and lm_head stay float.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

from pocketlm.converters.base import ConversionError, ConversionResult, ConvertOptions, atomic_output, check_cancel, settings_of
from pocketlm.converters.calibration import BUILTIN, calibration_text
from pocketlm.converters.gptq_walk import quantize_model
from pocketlm.models.errors import ModelFileError
from pocketlm.models.formats import CHECKPOINT_SIDE_FILES, ModelFormat, checkpoint_weight_files, inspect_model
from pocketlm.models.progress import ProgressCallback
from pocketlm.models.safetensors_header import read_safetensors_header

BITS = (2, 4, 8)  # the widths whose fields tile an int32 exactly; 3-bit packing straddles words and is not written
GROUP_SIZES = (32, 64, 128, -1)
_NOT_COPIED = {"config.json", "quantize_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "adapter_config.json"}
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_QUANTIZER = "pocketlm:0.1.0"


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = 128  # input columns sharing one scale; -1: one scale per output row
    act_order: bool = False  # quantize columns in order of decreasing activation energy (desc_act)
    calibration: str = BUILTIN  # "builtin" or the path of a UTF-8 text file
    # Hessian damping, as a fraction of its mean diagonal. 0.05 is GPTQModel's default; with the short built-in text
    # 0.01 overfits some layers (per layer, held-out error above round-to-nearest's). Around it the held-out
    # perplexity moves within its noise: 0.04/0.05/0.06 gave 44.6/43.7/44.3 with 11 chunks of Python documentation
    # (before the clipped scales), 0.05/0.1 gave 36.7/35.9 with the built-in text.
    damp_percent: float = 0.05


class GPTQConverter:
    name: ClassVar[str] = "gptq"
    source_formats: ClassVar[frozenset[str]] = frozenset({"safetensors"})
    target_format: ClassVar[str] = "gptq"
    label: ClassVar[str] = "GPTQ (transformers, vLLM)"
    summary: ClassVar[str] = ("About a quarter of float16's size at 4 bits, close to its quality after calibration; "
                              "runs on GPUs through transformers or vLLM, and on CPU through the PyTorch backend.")  # fmt: skip
    output_is_folder: ClassVar[bool] = True
    install_hint: ClassVar[str] = "pip install 'pocketlm[gptq]'"
    settings_type: ClassVar[type] = GPTQSettings

    @classmethod
    def is_available(cls) -> bool:
        return find_spec("torch") is not None and find_spec("transformers") is not None

    @classmethod
    def quantizes(cls, settings: object) -> bool:
        return True

    @classmethod
    def output_label(cls, settings: object) -> str:
        s = settings if isinstance(settings, GPTQSettings) else GPTQSettings()
        return f"GPTQ-{s.bits}bit-g{s.group_size}" + ("-act-order" if s.act_order else "")

    @classmethod
    def expected_size(cls, parameter_count: int, settings: object) -> int:
        """An upper estimate: every weight at `bits` plus 10% (scales, zeros, g_idx), and room for the float16
        embeddings and head, which the parameter count alone cannot separate (30% of the weights at 2 bytes; the
        135M test model's share is 21%, so its estimate is about 35% above the real 115 MB at 4 bits)."""
        s = settings if isinstance(settings, GPTQSettings) else GPTQSettings()
        return int(parameter_count * s.bits / 8 * 1.1 + parameter_count * 0.3 * 2)

    def convert(self, source: Path, destination: Path, options: ConvertOptions, on_progress: ProgressCallback) -> ConversionResult:
        settings = settings_of(self, options)
        assert isinstance(settings, GPTQSettings)
        check_settings(settings)
        config = _read_config(source)
        weights = _check_source(source, settings)
        text = calibration_text(settings.calibration)
        quantized = quantize_model(source, text, settings, options, on_progress)
        with atomic_output(destination, folder=True) as folder:
            _write_weights(folder, weights, quantized, settings)
            _write_config(folder, config, settings)
            for side_file in sorted(CHECKPOINT_SIDE_FILES - _NOT_COPIED):
                if (source / side_file).is_file():
                    shutil.copy2(source / side_file, folder / side_file)
            check_cancel(options)
        how = f"GPTQ {settings.bits}-bit g{settings.group_size}" + (" act-order" if settings.act_order else "")
        return ConversionResult(destination, how)


def check_settings(settings: GPTQSettings) -> None:
    if settings.bits == 3:
        raise ConversionError("pocketlm does not write 3-bit GPTQ: its packing splits values across words, which not every loader reads alike.",
                              "Choose 4 bits (or 2 or 8).")  # fmt: skip
    if settings.bits not in BITS:
        raise ConversionError(f"GPTQ cannot quantize to {settings.bits} bits.", "Choose 4 bits (or 2 or 8).")
    if settings.group_size not in GROUP_SIZES:
        raise ConversionError(f"{settings.group_size} is not a GPTQ group size pocketlm writes.", "Choose 32, 64, 128 or -1 (one group per row).")
    if not 0 < settings.damp_percent < 1:
        raise ConversionError(f"The damping {settings.damp_percent} is not a fraction between 0 and 1.", "Use a value such as 0.01 or 0.05.")


def _read_config(source: Path) -> dict[str, Any]:
    try:
        facts = inspect_model(source)
    except ModelFileError as error:
        raise ConversionError(error.message, error.hint) from None
    if facts.format == ModelFormat.PYTORCH:
        raise ConversionError(f"{source.name} holds its weights only as pickle files, which pocketlm never loads (they can run code).",
                              "Use a checkpoint with *.safetensors weights.")  # fmt: skip
    if facts.format != ModelFormat.SAFETENSORS:
        raise ConversionError(f"{source.name} is a {facts.format.value} model ({facts.quantization}); GPTQ starts from a float checkpoint.",
                              "Quantize the original safetensors checkpoint instead.")  # fmt: skip
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))  # inspect_model read it as a JSON object
    from pocketlm.converters.checkpoint_checks import read_hyperparameters
    from pocketlm.converters.gguf_architectures import ARCHITECTURES, supported_names

    names = config.get("architectures")
    known = [n for n in names if isinstance(n, str) and n in ARCHITECTURES] if isinstance(names, list) else []
    if not known:
        raise ConversionError(f"pocketlm cannot quantize {names or config.get('model_type')!r} to GPTQ yet.", f"Supported: {supported_names()}.")
    read_hyperparameters(config, ARCHITECTURES[known[0]])  # a damaged config.json is refused before transformers builds it
    return config


def _check_source(source: Path, settings: GPTQSettings) -> list[Path]:
    """The weight files, after checking that every decoder-layer matrix can be grouped and packed as asked."""
    files = [source / n for n in checkpoint_weight_files(sorted(p.name for p in source.iterdir()))]
    inputs: set[int] = set()
    outputs: set[int] = set()
    for file in files:
        for entry in read_safetensors_header(file).tensors:
            if entry.dtype not in _FLOAT_DTYPES:
                raise ConversionError(f"{file.name} stores {entry.name} as {entry.dtype}; GPTQ starts from F32, F16 or BF16 weights.",
                                      "Quantize the original float checkpoint instead.")  # fmt: skip
            if ".layers." in entry.name and entry.name.endswith(".weight") and len(entry.shape) == 2:
                outputs.add(entry.shape[0])
                inputs.add(entry.shape[1])
    per_word = 32 // settings.bits
    unpackable = sorted(n for n in inputs | outputs if n % per_word)
    if unpackable:
        raise ConversionError(f"A layer of {unpackable[0]} rows or columns cannot be packed {per_word} values to a word at {settings.bits} bits.",
                              "This model cannot be written as GPTQ at this width.")  # fmt: skip
    if settings.group_size != -1 and any(n % settings.group_size for n in inputs):
        odd = min(n for n in inputs if n % settings.group_size)
        fits = [g for g in (128, 64, 32) if all(n % g == 0 for n in inputs)]
        suggestion = f"Use group size {fits[0]}" if fits else "Use group size -1 (one group per row)"
        raise ConversionError(f"Group size {settings.group_size} does not divide the {odd} inputs of some of this model's layers.",
                              f"{suggestion}, which divides every layer.")  # fmt: skip
    return files


def _write_weights(folder: Path, files: list[Path], quantized: dict[str, Any], settings: GPTQSettings) -> None:
    """Every source tensor, float ones as float16 (bfloat16 stays: its range may not fit float16), each quantized
    linear's weight replaced by its packed tensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pocketlm.converters.gptq_solver import packed_tensors

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():
                tensor = reader.get_tensor(key)
                tensors[key] = tensor.half() if tensor.dtype == torch.float32 else tensor
    for prefix, result in quantized.items():
        if tensors.pop(f"{prefix}.weight", None) is None:
            raise ConversionError(f"The checkpoint names {prefix}'s weight differently from transformers, so it cannot be replaced.",
                                  "This checkpoint's layout is not supported for GPTQ.")  # fmt: skip
        for suffix, tensor in packed_tensors(result, settings.bits).items():
            tensors[f"{prefix}.{suffix}"] = tensor.cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def quantization_config(settings: GPTQSettings) -> dict[str, Any]:
    """The keys GPTQModel 7.6 writes (and transformers' GPTQConfig and vLLM read) for a GPTQ v1 checkpoint."""
    return {
        "bits": settings.bits, "group_size": settings.group_size, "desc_act": settings.act_order, "sym": True,
        "lm_head": False, "quant_method": "gptq", "method": "gptq", "format": "gptq", "checkpoint_format": "gptq",
        "pack_dtype": "int32", "damp_percent": settings.damp_percent, "true_sequential": True, "static_groups": False,
        "meta": {"quantizer": [_QUANTIZER], "damp_percent": settings.damp_percent, "true_sequential": True, "static_groups": False},
    }  # fmt: skip


def _write_config(folder: Path, config: dict[str, Any], settings: GPTQSettings) -> None:
    quant = quantization_config(settings)
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quant}, indent=2) + "\n", encoding="utf-8")
    (folder / "quantize_config.json").write_text(json.dumps(quant, indent=2) + "\n", encoding="utf-8")
