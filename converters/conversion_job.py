"""A conversion as users ask for it: a stored model to a target format (GGUF, GPTQ, ...), in as many steps as the
registered converters need, optionally quantized, placed in the store's folder or where the user says, and registered
with its lineage. The CLI and the app both run this."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from pocketlm.converters.base import ConversionError, Converter, ConvertOptions
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.registry import converter_classes, plan_steps, refuse_unavailable
from pocketlm.models.errors import NotEnoughDisk
from pocketlm.models.fit import gib
from pocketlm.models.leftovers import converting_prefix, registering_name, working_elsewhere
from pocketlm.models.locations import models_dir
from pocketlm.models.progress import ProgressCallback, ignore_progress
from pocketlm.models.store import LocalModel, ModelStore

_SUFFIX = re.compile(r":(F32|F16|BF16|Q8_0)$", re.IGNORECASE)
# llama.cpp keeps embeddings and some layers at higher types than a quant's average; GPTQ keeps them unquantized.
_SIZE_MARGIN = 1.15
_SIZE_SLACK = 16 * 2**20
# A single-file format whose files carry another suffix: a GGUF LoRA is a .gguf file, as llama.cpp's tools name it.
_FILE_SUFFIXES = {"gguf-lora": "gguf"}


@dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will do, known before any work: its steps, their settings, the output's name and place."""

    source: LocalModel
    steps: tuple[type[Converter], ...]
    settings: object  # the target converter's settings, made concrete (an "auto" type resolved for this source)
    name: str
    destination: Path  # a file, or a folder when the last step writes one

    @property
    def needed_bytes(self) -> int:
        """Disk the steps write, every intermediate output included, with llama.cpp's and GPTQ's overheads."""
        parameters = self.source.parameter_count or self.source.size_bytes // 2
        total = sum(step.expected_size(parameters, _step_settings(step, self.settings)) for step in self.steps)
        return int(total * _SIZE_MARGIN) + _SIZE_SLACK


def output_name(source_name: str, label: str) -> str:
    """`owner/model` → `owner/model:Q4_K_M`; a GGUF already named for its type (`x:F16`) gets the new one instead."""
    return f"{_SUFFIX.sub('', source_name)}:{label}"


def file_name_for(name: str, converter: type[Converter] | None = None) -> str:
    """A file or folder name for the store name `name`: `.gguf` for a GGUF file, no suffix for a folder. A name with
    nothing left to name a file by (`???`), or hidden or pointing upwards (`.x`, `..`), is refused: the output would
    be the models folder itself, its parent, or a name the sweep of work in progress could take for its own."""
    base = re.sub(r"[^\w.-]+", "-", name).strip("-")
    if not base or base.startswith("."):
        raise ConversionError(f"{name!r} cannot name the output's file or folder.", "Choose a --name with letters or digits that does not start with a dot.")
    if converter is not None and converter.output_is_folder:
        return base
    target_format = converter.target_format if converter is not None else "gguf"
    return f"{base}.{_FILE_SUFFIXES.get(target_format, target_format)}"


def outtype_for(source: LocalModel | None, outtype: str) -> str:
    """`auto` made concrete: bf16 for a bf16 checkpoint (f16 could overflow its large values), else f16."""
    if outtype != "auto":
        return outtype
    return "bf16" if source is not None and source.quantization == "BF16" else "f16"


def plan_conversion(store: ModelStore, source: LocalModel, target_format: str, options: ConvertOptions, name: str | None = None,
                    output: Path | None = None) -> ConversionPlan:  # fmt: skip
    """Check everything that can be checked before work starts, and say what the conversion will make and where."""
    steps = _steps(source, target_format, options.settings)
    settings = _concrete_settings(source, steps, options.settings)
    for step in steps:
        refuse_unavailable(step)
    target_name = name or output_name(source.name, steps[-1].output_label(settings))
    destination = _destination(target_name, steps[-1], output)
    _refuse_collisions(store, source, target_name, destination, steps[-1])
    return ConversionPlan(source, tuple(steps), settings, target_name, destination)


def convert_model(store: ModelStore, source: LocalModel, target_format: str, options: ConvertOptions,
                  on_progress: ProgressCallback = ignore_progress, name: str | None = None, output: Path | None = None) -> LocalModel:  # fmt: skip
    """Convert `source` to `target_format` (and quantize it when its settings ask); register the result as its child."""
    plan = plan_conversion(store, source, target_format, options, name, output)
    _check_space(plan)
    options = replace(options, model_name=options.model_name or source.name, settings=plan.settings)
    options = _with_importance_matrix(store, plan, options, on_progress)
    destination = plan.destination
    # A kill -9 between the output's rename and its registration would leave a model no entry points at: this mark
    # tells the store's sweep to delete it then (models/leftovers.py).
    registering = destination.with_name(registering_name(destination.name, os.getpid()))
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Outside the models folder, a mark there first: the next start's sweep then finds this process's leftovers too.
    with working_elsewhere(destination.parent, models_dir()):
        registering.touch()
        try:
            return _run_steps(store, plan, options, on_progress)
        finally:
            registering.unlink(missing_ok=True)


def _run_steps(store: ModelStore, plan: ConversionPlan, options: ConvertOptions, on_progress: ProgressCallback) -> LocalModel:
    """The steps, each writing the next one's input, the last writing the output; then the output registered."""
    destination, last = plan.destination, plan.steps[-1]
    steps: list[str] = []
    # Named after this process, so that the store's sweep can tell work a kill -9 abandoned from work in progress.
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=converting_prefix(os.getpid())) as work:
        current = plan.source.path
        for index, step in enumerate(plan.steps):
            is_last = index == len(plan.steps) - 1
            written = destination if is_last else Path(work) / file_name_for(f"step-{index}", step)
            step_options = replace(options, settings=_step_settings(step, plan.settings))
            result = step().convert(current, written, step_options, on_progress)
            current = result.path
            steps.append(result.how)
    try:
        return store.register(destination, source="convert", name=plan.name, parent=plan.source.name, lineage=", ".join(steps), owned=True,
                              written_folder=last.output_is_folder)  # fmt: skip
    except BaseException:
        _delete_output(destination, last)  # a model no entry points at would be lost on disk
        raise


def _steps(source: LocalModel, target_format: str, settings: object | None) -> list[type[Converter]]:
    """The converters from the source's format to the target's, then the target's own quantizer when the settings
    ask for a quantization that the step reaching the target does not do."""
    steps = [] if source.format == target_format else plan_steps(source.format, target_format)
    quantizer = next((c for c in converter_classes() if target_format in c.source_formats and c.target_format == target_format), None)
    if quantizer is not None:
        wanted = settings if settings is not None else quantizer.settings_type()
        if isinstance(wanted, quantizer.settings_type) and quantizer.quantizes(wanted) and not (steps and steps[-1].quantizes(wanted)):
            steps.append(quantizer)
    if not steps:
        if target_format == "gguf":
            raise ConversionError(f"{source.name} is already a GGUF file.", "Pass a quantization (e.g. --quant Q4_K_M) to make a smaller one.")
        raise ConversionError(f"{source.name} is already a {target_format} model.", "Convert from its checkpoint instead.")
    return steps


def _concrete_settings(source: LocalModel, steps: list[type[Converter]], settings: object | None) -> object:
    """The target converter's settings (its defaults when none were given), checked against it; GGUF's `auto` output
    type is resolved here, because the output's name says which type it became."""
    target = steps[-1]
    if settings is None:
        settings = target.settings_type()
    if not isinstance(settings, target.settings_type):
        raise ConversionError(f"Converting to {target.label} takes {target.settings_type.__name__}, not {type(settings).__name__}.")
    if isinstance(settings, GGUFSettings):
        if settings.quant and settings.outtype == "q8_0":
            raise ConversionError("Quantizing starts from an f16, bf16 or f32 GGUF, not q8_0.", "Drop --outtype q8_0, or drop --quant.")
        settings = replace(settings, outtype=outtype_for(source, settings.outtype))
    return settings


def _step_settings(step: type[Converter], settings: object) -> object:
    """A step of another family than the target (an intermediate format) runs with its own defaults."""
    return settings if isinstance(settings, step.settings_type) else step.settings_type()


def _destination(name: str, last: type[Converter], output: Path | None) -> Path:
    if output is None:
        destination = models_dir() / file_name_for(name, last)
        if destination.parent != models_dir():  # file_name_for keeps it a plain name; this says so where it matters
            raise ConversionError(f"{name!r} would put the output outside pocketlm's models folder.", "Choose another --name, or give --output.")
        return destination
    output = Path(output).expanduser().absolute()
    if not last.output_is_folder and output.is_dir():  # a folder given for a file output: the file goes inside it
        return output / file_name_for(name, last)
    return output


def _refuse_collisions(store: ModelStore, source: LocalModel, name: str, destination: Path, last: type[Converter]) -> None:
    """Converting again to the same name replaces that conversion; anything else of that name or place is kept."""
    if _overlaps(destination, [source.path, *source.files]):
        raise ConversionError(f"{destination} is where {source.name} is; converting onto it would destroy the source.",
                              "Give another --output path or --name.")  # fmt: skip
    existing = store.get(name)
    if existing is not None and existing.path != destination:
        raise ConversionError(f"There is already a model named {name!r} ({existing.source}).", "Remove it first (`pocketlm rm`), or convert under another name.")
    for model in store.list():
        if model.name != name and _overlaps(destination, [model.path, *model.files]):
            raise ConversionError(f"{destination} already holds {model.name}.", "Remove that model first, or give another --output path or --name.")
    if last.output_is_folder and destination.exists() and not destination.is_dir():
        raise ConversionError(f"{destination} is a file; this conversion writes a folder.", "Give --output a folder path.")
    # Only an earlier result of this very conversion is replaced: what the user keeps there, or imported, never is.
    if (destination.exists() or destination.is_symlink()) and not (existing is not None and _replaceable(store, existing, last)):
        raise ConversionError(f"{destination} already exists; pocketlm does not replace what it did not write.", "Give another --output path or --name, or move it away.")


def _overlaps(destination: Path, places: list[Path]) -> bool:
    """Whether writing `destination` would touch any of `places`: the same path, one inside the other."""
    target = destination.resolve()
    for place in places:
        resolved = place.resolve()
        if target == resolved or target in resolved.parents or resolved in target.parents:
            return True
    return False


def _replaceable(store: ModelStore, earlier: LocalModel, last: type[Converter]) -> bool:
    """An earlier output of a conversion under this name: registered as one, every file pocketlm's own, and, for a
    folder, a folder pocketlm created."""
    if earlier.source != "convert" or not earlier.files or not all(store.is_owned(f) for f in earlier.files):
        return False
    return earlier.written_folder or not last.output_is_folder


def _check_space(plan: ConversionPlan) -> None:
    """Refuse before writing when the output (and every intermediate step) cannot fit, with the numbers."""
    folder = plan.destination.parent
    folder.mkdir(parents=True, exist_ok=True)
    needed = plan.needed_bytes
    free = shutil.disk_usage(folder).free
    work_free = shutil.disk_usage(models_dir()).free
    if os.stat(folder).st_dev != os.stat(models_dir()).st_dev:
        # Intermediate outputs go to the store's folder, the result where the user said: each disk is checked alone.
        parameters = plan.source.parameter_count or plan.source.size_bytes // 2
        last = plan.steps[-1].expected_size(parameters, plan.settings)
        needed, work_needed = int(last * _SIZE_MARGIN) + _SIZE_SLACK, needed - last
        if work_needed > work_free:
            raise NotEnoughDisk(f"Converting {plan.source.name} needs about {gib(work_needed)} of working space on {models_dir()}, but only {gib(work_free)} is free.",
                                "Free some space, or choose a smaller output type.")  # fmt: skip
    if needed > free:
        raise NotEnoughDisk(f"Converting {plan.source.name} needs about {gib(needed)} on {folder}, but only {gib(free)} is free.",
                            "Free some space, or choose a smaller output type.")  # fmt: skip


def _with_importance_matrix(store: ModelStore, plan: ConversionPlan, options: ConvertOptions, on_progress: ProgressCallback) -> ConvertOptions:
    """GGUF's imatrix from a calibration text: computed once, from the checkpoint (the source itself, or the
    checkpoint a GGUF came from), before the quantizer runs. A llama-imatrix .gguf is read by the quantizer itself."""
    settings = plan.settings
    if not isinstance(settings, GGUFSettings) or not settings.quant or not settings.imatrix or str(settings.imatrix).endswith(".gguf"):
        return options
    from pocketlm.converters.calibration import calibration_text
    from pocketlm.converters.importance_matrix import compute_imatrix

    text = calibration_text(str(settings.imatrix))
    checkpoint = plan.source
    while checkpoint.format != "safetensors" and checkpoint.parent and (parent := store.get(checkpoint.parent)):
        checkpoint = parent
    if checkpoint.format != "safetensors":
        raise ConversionError(f"An importance matrix is computed on the checkpoint, and {plan.source.name} has none in the store.",
                              "Convert from the checkpoint with --imatrix, or give a llama-imatrix .gguf file.")  # fmt: skip
    matrix = compute_imatrix(checkpoint.path, text, on_progress, options.cancel)
    return replace(options, settings=replace(settings, importance_matrix=matrix))


def _delete_output(destination: Path, last: type[Converter]) -> None:
    if last.output_is_folder and destination.is_dir() and not destination.is_symlink():
        shutil.rmtree(destination, ignore_errors=True)
    else:
        destination.unlink(missing_ok=True)
