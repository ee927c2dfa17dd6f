"""A conversion as users ask for it: a stored model (or a path) to GGUF, optionally quantized, registered with its
lineage. The CLI and the app both run this."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from pocketlm.converters.base import ConversionError, ConvertOptions
from pocketlm.converters.registry import converter_for
from pocketlm.models.errors import NotEnoughDisk
from pocketlm.models.fit import gib
from pocketlm.models.leftovers import converting_prefix, registering_name
from pocketlm.models.locations import models_dir
from pocketlm.models.progress import ProgressCallback, ignore_progress
from pocketlm.models.store import LocalModel, ModelStore

_SUFFIX = re.compile(r":(F32|F16|BF16|Q8_0)$", re.IGNORECASE)
# Bytes per weight of each GGUF output type (Q8_0: 34 bytes per block of 32 weights).
OUTTYPE_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625}


def output_name(source_name: str, label: str) -> str:
    """`owner/model` → `owner/model:Q4_K_M`; a GGUF already named for its type (`x:F16`) gets the new one instead."""
    return f"{_SUFFIX.sub('', source_name)}:{label}"


def file_name_for(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") + ".gguf"


def outtype_for(source: LocalModel | None, outtype: str) -> str:
    """`auto` made concrete: bf16 for a bf16 checkpoint (f16 could overflow its large values), else f16."""
    if outtype != "auto":
        return outtype
    return "bf16" if source is not None and source.quantization == "BF16" else "f16"


def _check_space(source: LocalModel, destination: Path, options: ConvertOptions) -> None:
    """Refuse before writing when the output (and the f16 step of a quantization) cannot fit, with the numbers."""
    parameters = source.parameter_count or source.size_bytes // 2
    needed = int(parameters * OUTTYPE_BYTES_PER_WEIGHT[options.outtype]) if source.format != "gguf" else 0
    if options.quant:
        from pocketlm.converters.quant_types import expected_size, quant_type

        needed += expected_size(parameters, quant_type(options.quant))
    # llama.cpp keeps embeddings and some layers at higher types than the quant's average: room for that, plus slack.
    needed = int(needed * 1.15) + 16 * 2**20
    free = shutil.disk_usage(destination.parent).free
    if needed > free:
        raise NotEnoughDisk(f"Converting {source.name} needs about {gib(needed)} on {destination.parent}, but only {gib(free)} is free.",
                            "Free some space, or choose a smaller output type.")  # fmt: skip


def _importance_matrix(store: ModelStore, source: LocalModel, options: ConvertOptions, on_progress: ProgressCallback) -> dict:  # type: ignore[type-arg]
    """From a calibration text, run through the checkpoint: the source itself, or the checkpoint a GGUF came from."""
    from pocketlm.converters.importance_matrix import calibration_text, compute_imatrix

    text = calibration_text(str(options.imatrix))
    checkpoint = source
    while checkpoint.format != "safetensors" and checkpoint.parent and (parent := store.get(checkpoint.parent)):
        checkpoint = parent
    if checkpoint.format != "safetensors":
        raise ConversionError(f"An importance matrix is computed on the checkpoint, and {source.name} has none in the store.",
                              "Convert from the checkpoint with --imatrix, or give a llama-imatrix .gguf file.")  # fmt: skip
    return compute_imatrix(checkpoint.path, text, on_progress, options.cancel)


def convert_model(store: ModelStore, source: LocalModel, options: ConvertOptions, on_progress: ProgressCallback = ignore_progress,
                  name: str | None = None) -> LocalModel:  # fmt: skip
    """Convert `source` to GGUF (a checkpoint) and/or quantize it (a GGUF); register the result as its child."""
    if source.format not in ("safetensors", "gguf"):
        raise ConversionError(f"{source.name} is a {source.format} model; pocketlm converts safetensors checkpoints and quantizes GGUF files.")
    if source.format == "gguf" and not options.quant:
        raise ConversionError(f"{source.name} is already a GGUF file.", "Pass a quantization (e.g. --quant Q4_K_M) to make a smaller one.")
    if options.quant and options.outtype == "q8_0":
        raise ConversionError("Quantizing starts from an f16, bf16 or f32 GGUF, not q8_0.", "Drop --outtype q8_0, or drop --quant.")
    options = replace(options, outtype=outtype_for(source, options.outtype))
    label = options.quant.upper() if options.quant else options.outtype.upper()
    target_name = name or output_name(source.name, label)
    destination = models_dir() / file_name_for(target_name)
    _refuse_collisions(store, target_name, destination)
    _check_space(source, destination, options)
    options = replace(options, model_name=options.model_name or source.name)
    if options.quant and options.imatrix and not str(options.imatrix).endswith(".gguf"):
        matrix = _importance_matrix(store, source, options, on_progress)
        options = replace(options, importance_matrix=matrix)
    steps: list[str] = []
    # A kill -9 between the output's rename and its registration would leave a model no entry points at: this mark
    # tells the store's sweep to delete it then (models/leftovers.py).
    registering = destination.with_name(registering_name(destination.name, os.getpid()))
    registering.touch()
    try:
        # Named after this process, so that the store's sweep can tell work a kill -9 abandoned from work in progress.
        with tempfile.TemporaryDirectory(dir=models_dir(), prefix=converting_prefix(os.getpid())) as work:
            gguf_path = source.path
            if source.format == "safetensors":
                converted = destination if not options.quant else Path(work) / "f16.gguf"
                result = converter_for("safetensors", "gguf").convert(source.path, converted, options, on_progress)
                gguf_path, steps = result.path, [result.how]
            if options.quant:
                result = converter_for("gguf", "gguf").convert(gguf_path, destination, options, on_progress)
                steps.append(result.how)
        try:
            return store.register(destination, source="convert", name=target_name, parent=source.name, lineage=", ".join(steps), owned=True)
        except BaseException:
            destination.unlink(missing_ok=True)  # a model file no entry points at would be lost on disk
            raise
    finally:
        registering.unlink(missing_ok=True)


def _refuse_collisions(store: ModelStore, name: str, destination: Path) -> None:
    """Converting again to the same name replaces that conversion; anything else of that name or file is kept."""
    existing = store.get(name)
    if existing is not None and existing.path != destination:
        raise ConversionError(f"There is already a model named {name!r} ({existing.source}).", "Remove it first (`pocketlm rm`), or convert under another name.")
    for model in store.list():
        if model.path == destination and model.name != name:
            raise ConversionError(f"{destination.name} already belongs to {model.name}.", "Remove that model first, or convert under another name.")
