"""Verify a conversion: score the same text through the converted model and the model it came from, judge how far
apart they are (backends/model_comparison.py), and keep the verdict with the model in the store.

Shared by `pocketlm verify`, the end of `pocketlm convert` and the Convert screen. Nothing heavy is imported at module
level: the details panel and `info` import this for the verdict's wording.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.models.errors import Cancelled, PocketError
from pocketlm.models.float_types import is_float_type
from pocketlm.models.progress import ProgressCallback, ProgressUpdate, ignore_progress
from pocketlm.models.store import LocalModel, ModelStore
from pocketlm.models.verification_record import VerificationRecord

if TYPE_CHECKING:
    from pocketlm.backends.base import LoadOptions
    from pocketlm.backends.model_comparison import Scoring

BUILTIN_TEXT = "built-in"
# Verification after `convert` is on by default up to this many parameters, for the time it takes: on the 135M starter
# model `pocketlm verify` took 8 s here (2 shared cores, both loads included) and the work grows with the parameter
# count, so about a minute at 1B: worth it right after a conversion that itself took minutes, while at 7B (about 7
# minutes here) it would double a conversion's time unasked. Memory is checked apart (verification_memory_note).
AUTO_VERIFY_MAX_PARAMETERS = 1_000_000_000
# The vocabulary assumed when a model's own config.json does not say it (a GGUF): Gemma's 262,144, the largest in
# common use, so that the estimate errs on the side of not verifying unasked.
_ASSUMED_VOCABULARY = 262_144
# --text is read up to this many characters: COMPARISON_TOKENS tokens of prose are about 2,000 characters, and even
# a text of single characters tokenized one byte at a time (4 tokens a character at worst) is scored whole.
_TEXT_CHARACTERS = 64 * 1024


@dataclass(frozen=True)
class LevelLook:
    """How a level is shown: the word after the model's name, the flag on its row, and its colour (None: plain)."""

    headline: str
    flag: str
    colour: str | None


# One table for the CLI, `info` and the Models screen. A quantization's usual loss reads calmly, as verified, in the
# plain colour: it is what the user asked for. Only broken is red, with what to do.
LEVEL_LOOKS = {"faithful": LevelLook("faithful", " ✓", "green"), "lossy": LevelLook("verified", " ✓", None),
               "broken": LevelLook("broken", " ✗ broken", "red")}  # fmt: skip


def reference_for(store: ModelStore, model: LocalModel, against: str | None = None) -> LocalModel:
    """The model to compare `model` with: `against` (a store name, a prefix or a path), else its lineage parent."""
    from pocketlm.models.model_reference import find_model

    if against is not None:
        reference = find_model(store, against)
    elif not model.parent:
        raise PocketError(f"{model.name} was not converted from a model in the store, so there is nothing to verify it against.",
                          f"Name the model it should compute the same as: `pocketlm verify {model.name} --against REFERENCE`.")  # fmt: skip
    else:
        found = store.get(model.parent)
        if found is None:
            raise PocketError(f"{model.name} was made from {model.parent}, which is no longer in the store.",
                              f"Pull or import it again, or name another reference: `pocketlm verify {model.name} --against REFERENCE`.")  # fmt: skip
        reference = found
    if reference.path.absolute() == model.path.absolute():
        raise PocketError(f"{model.name} would be compared with itself.", "Name another model with --against.")
    if reference.is_adapter or model.is_adapter:
        adapter = model if model.is_adapter else reference
        raise PocketError(f"{adapter.name} is a LoRA adapter, not a model: verify compares two models' predictions.",
                          "Verify the model the adapter was trained on, or a conversion of it.")  # fmt: skip
    return reference


def should_verify_after_convert(model: LocalModel) -> bool:
    """Whether `convert` verifies `model` (its result) unasked: small models only (AUTO_VERIFY_MAX_PARAMETERS says why)."""
    return bool(model.parent) and 0 < model.parameter_count <= AUTO_VERIFY_MAX_PARAMETERS


def verification_memory_note(reference: LocalModel, model: LocalModel) -> str:
    """"" when verifying `model` against `reference` fits in the free memory, else one sentence saying what it needs.

    One model is loaded at a time (models/fit.py's estimate at COMPARISON_TOKENS of context; a float reference in
    float32), beside what the scoring keeps: both models' logits (COMPARISON_TOKENS × vocabulary × 4 bytes each) and
    the float64 blocks they are compared in. On the 135M starter model this says 1.15 GiB for the reference's turn;
    `pocketlm verify` peaked at 1.0 GiB resident here (Python and torch included), where loading both at once took
    1.6 GB."""
    from pocketlm.backends.model_comparison import COMPARISON_TOKENS
    from pocketlm.models.fit import estimate_model_memory, gib

    vocabulary = _vocabulary(reference) or _vocabulary(model) or _ASSUMED_VOCABULARY
    scoring = 2 * COMPARISON_TOKENS * vocabulary * 4 + (256 + 3 * 64) * vocabulary * 8
    for which in (reference, model):
        estimate = estimate_model_memory(which, COMPARISON_TOKENS)
        if which is reference and _loads_as_float32(reference):
            estimate = replace(estimate, weights_bytes=reference.parameter_count * 4)
        if estimate.total_bytes + scoring > estimate.available_bytes:
            return (f"verifying needs about {gib(estimate.total_bytes + scoring)} to hold {which.name} and the scores, "
                    f"and {gib(estimate.available_bytes)} of {estimate.memory_name} is free")  # fmt: skip
    return ""


def _vocabulary(model: LocalModel) -> int:
    """The vocabulary size a checkpoint's config.json gives (0 when it is not a folder or does not say)."""
    import json

    try:
        config = json.loads((model.path / "config.json").read_text(encoding="utf-8")) if model.path.is_dir() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return 0
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    vocabulary = config.get("vocab_size") if isinstance(config, dict) else None
    return vocabulary if isinstance(vocabulary, int) and vocabulary > 0 else 0


def _loads_as_float32(reference: LocalModel) -> bool:
    """A float checkpoint (PyTorch, MLX) is the reference in float32, whatever the device would pick: a GPU's
    bf16/f16 would round it more than a float conversion does, and a faithful f16 result would look lossy."""
    return reference.format != "gguf" and is_float_type(reference.quantization)


def scoring_options(which: LocalModel, options: LoadOptions, reference: bool = False) -> LoadOptions:
    """How `which` loads to be scored: with the context scored; a float checkpoint reference in float32
    (_loads_as_float32); a GGUF in its own types (llama.cpp refuses a dtype), anything else with the dtype asked."""
    from pocketlm.backends.model_comparison import COMPARISON_TOKENS

    if reference and _loads_as_float32(which):
        dtype: str | None = "float32"
    else:
        dtype = None if which.format == "gguf" else options.dtype
    return replace(options, dtype=dtype, context_length=COMPARISON_TOKENS)


def quantized(reference: LocalModel, model: LocalModel) -> bool:
    """Whether the comparison may cost what quantizing does: unless both are float weights (judge's `quantized`)."""
    return not (is_float_type(model.quantization) and is_float_type(reference.quantization))


def verification_text(text_file: str | Path | None) -> tuple[str, str]:
    """(label, text) for `--text FILE`: the file's name and its first _TEXT_CHARACTERS, or the built-in held-out prose."""
    if text_file is None:
        from pocketlm.converters.calibration import HELD_OUT_TEXT

        return BUILTIN_TEXT, HELD_OUT_TEXT
    path = Path(text_file).expanduser()
    try:
        with path.open(encoding="utf-8") as file:
            text = file.read(_TEXT_CHARACTERS)
    except (OSError, UnicodeDecodeError) as error:
        reason = "it is not UTF-8 text" if isinstance(error, UnicodeDecodeError) else (error.strerror or str(error)).lower()
        raise PocketError(f"Cannot read the text {path}: {reason}.", "Give a UTF-8 text file, or leave out --text for the built-in one.") from None
    if not text.strip():
        raise PocketError(f"The text {path} is empty.", "Give a file with some prose in it, or leave out --text for the built-in one.")
    return path.name, text


def verify_model(store: ModelStore, model: LocalModel, reference: LocalModel, text: str | Path | None, options: LoadOptions,
                 cancel: threading.Event | None = None, on_progress: ProgressCallback = ignore_progress) -> VerificationRecord:  # fmt: skip
    """Load the reference (in float32 when a float checkpoint), score `text` (a text file's path; None: the built-in
    prose), close it, then load and score `model` on the same ids: one model in memory at a time. Judge the two, and
    keep the verdict with `model` when it is in the store. Cancelled between steps and while scoring."""
    from pocketlm.backends.model_comparison import compare, judge
    from pocketlm.models.model_reference import is_registered

    cancel = cancel or threading.Event()
    label, contents = verification_text(text)
    description = f"Comparing {model.name} with {reference.name}"
    reference_scoring = _scored(reference, scoring_options(reference, options, reference=True), contents, None, cancel, on_progress)
    on_progress(ProgressUpdate(description, 1, 3))
    model_scoring = _scored(model, scoring_options(model, options), contents, reference_scoring.ids, cancel, on_progress)
    on_progress(ProgressUpdate(description, 2, 3))
    _check(cancel)
    comparison = compare(reference_scoring, model_scoring)
    on_progress(ProgressUpdate(description, 3, 3))
    verdict = judge(comparison, quantized(reference, model))
    record = VerificationRecord(model=model.name, reference=reference.name, level=verdict.level, summary=verdict.summary, advice=verdict.advice,
                                scored_tokens=comparison.scored_tokens, tokens_identical=comparison.tokens_identical,
                                top1_agreement=comparison.top1_agreement, mean_kld=comparison.mean_kld,
                                perplexity_change=comparison.perplexity_change, text=label, verified_at=time.time())  # fmt: skip
    if is_registered(model):
        store.record_verification(record)
    return record


def _scored(which: LocalModel, options: LoadOptions, text: str, ids: Sequence[int] | None, cancel: threading.Event,
            on_progress: ProgressCallback) -> Scoring:  # fmt: skip
    """`which` loaded through its default backend, scored (model_comparison.score), and closed again."""
    from pocketlm.app.model_loading import ModelChoice, load_model
    from pocketlm.backends.model_comparison import score

    _check(cancel)
    on_progress(ProgressUpdate(f"Loading {which.name}"))
    loaded = load_model(ModelChoice(which.name, which.path, which.format), options)
    try:
        on_progress(ProgressUpdate(f"Scoring with {which.name}"))
        return score(loaded, text, ids, cancel=cancel)
    finally:
        loaded.close()


def _check(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled("Verification cancelled.", "Run `pocketlm verify MODEL` to verify it later.")


def text_name(record: VerificationRecord) -> str:
    """What the record's text was, as a sentence names it: "the built-in text" or the file's name."""
    return "the built-in text" if record.text == BUILTIN_TEXT else record.text


def verdict_line(record: VerificationRecord) -> str:
    """The verdict in one line, read after "Verified: ": "tokens identical, top-1 98.7%, KLD 0.012, PPL +3.1% (against
    X, on the built-in text)", with "faithful, " or "broken, " before it for those levels."""
    level = "" if record.level == "lossy" else f"{record.level}, "
    return f"{level}{record.summary} (against {record.reference}, on {text_name(record)})"


def verify_later(model: LocalModel) -> str:
    return f"pocketlm verify {model.name}"


@dataclass(frozen=True)
class AfterConvert:
    """What verification after a conversion came to: a verdict, or a note saying why there is none and how to get one."""

    record: VerificationRecord | None = None
    note: str = ""


def verify_after_convert(store: ModelStore, model: LocalModel, options: LoadOptions, cancel: threading.Event | None = None,
                         on_progress: ProgressCallback = ignore_progress) -> AfterConvert:  # fmt: skip
    """Verify a conversion's result against its parent when it is small and the two fit in memory; whatever stops
    the verification (no backend for the reference, too little memory, a cancel, a surprise from an engine) is a
    one-line note, never a failed conversion: the result is kept."""
    from pocketlm.app.notify import as_pocket_error

    later = verify_later(model)
    if not should_verify_after_convert(model):
        return AfterConvert(note=f"Not verified automatically (only models up to {AUTO_VERIFY_MAX_PARAMETERS / 1e9:g}B parameters are): "
                                 f"run `{later}` to check it.")  # fmt: skip
    try:
        reference = reference_for(store, model)
        if shortfall := verification_memory_note(reference, model):
            return AfterConvert(note=f"Not verified automatically: {shortfall}. Run `{later}` when more is free.")
        return AfterConvert(record=verify_model(store, model, reference, None, options, cancel, on_progress))
    except Cancelled:
        return AfterConvert(note=f"Verification cancelled; {model.name} is kept: run `{later}` to check it later.")
    except Exception as error:  # noqa: BLE001 - the conversion stands whatever stopped its verification
        sentence = " ".join(str(as_pocket_error("The verification", error)).split())  # one line, whatever an engine wrote
        return AfterConvert(note=f"Could not verify {model.name}: {sentence} Run `{later}` once that is fixed.")
