"""`pocketlm convert` and `pocketlm quantize`. Heavy imports stay inside each command.

The targets come from the converter registry, loaded only when convert's help or the command itself runs (a
converter module may import numpy): `pocketlm --help` never loads them. Each format option belongs to the target
whose settings dataclass has the field of its name, so a new target's options need no table here.
"""

from __future__ import annotations

import threading
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pocketlm.converters.mlx import DTYPES, RECIPES  # plain tuples: importing the module loads no mlx
from pocketlm.converters.quant_types import QUANT_TYPES

if TYPE_CHECKING:
    from pocketlm.converters.registry import ConversionTarget
    from pocketlm.models.store import LocalModel, ModelStore

# The quantizer's own table, so the help never lists a type it lacks (importing it loads no engine).
QUANT_HELP = ", ".join(QUANT_TYPES)
# Each format option: its flag as users type it, and the settings field it sets.
_FORMAT_OPTIONS = {"outtype": "--outtype", "quant": "--quant", "imatrix": "--imatrix", "bits": "--bits",
                   "group_size": "--group-size", "act_order": "--act-order/--no-act-order", "calibration": "--calibration",
                   "dtype": "--dtype", "recipe": "--recipe"}  # fmt: skip


_NO_VERIFY = click.option("--no-verify", is_flag=True, help="Do not verify the result against MODEL afterwards (done by default for models up to 1B parameters when both fit in memory: `pocketlm verify`); a broken result exits 1.")


def _targets() -> list[ConversionTarget]:
    from pocketlm.converters.registry import conversion_targets

    return conversion_targets()


class _TargetChoice(click.Choice):  # type: ignore[type-arg]
    """`--to`'s choices, read from the registry the first time they are needed rather than at import."""

    def __init__(self) -> None:
        super().__init__([])

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(target.format for target in _targets())

    @choices.setter
    def choices(self, _: object) -> None:
        pass


class _TargetOption(click.Option):
    """`--to`, whose help lists each target with its label and whether it is installed, written when shown."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        described = [f"{t.format}: {t.label}" + ("" if t.available else " (not installed)") for t in _targets()]
        self.help = "Target format. " + "; ".join(described) + "."
        return super().get_help_record(ctx)


def _target(target_format: str) -> ConversionTarget:
    from pocketlm.converters.registry import refuse_unavailable

    target = next(t for t in _targets() if t.format == target_format)
    refuse_unavailable(target)
    return target


def _settings(target: ConversionTarget, given: dict[str, object], no_quant: bool = False) -> object:
    """The target's settings from the options given; an option for another format is refused with a sentence.
    `no_quant` sets `bits` to None, for a target whose `bits` may be None (MLX's float weights)."""
    from pocketlm.models.errors import PocketError

    accepted = {field.name for field in fields(target.settings_type)}
    wrong = [name for name, value in given.items() if value is not None and name not in accepted]
    if wrong:
        own = ", ".join(flag for name, flag in _FORMAT_OPTIONS.items() if name in accepted) or "none"
        if no_quant and _takes_no_bits(target):
            own += ", --no-quant"
        raise PocketError(f"{', '.join(_FORMAT_OPTIONS[name].split('/')[0] for name in wrong)} does not apply to {target.label}.",
                          f"Its options are: {own}.")  # fmt: skip
    values = {name: value for name, value in given.items() if value is not None}
    if no_quant:
        if not _takes_no_bits(target):
            raise PocketError(f"--no-quant does not apply to {target.label}.",
                              "Leave out --quant for unquantized GGUF output; GPTQ always quantizes.")  # fmt: skip
        if values.get("bits") is not None or values.get("recipe") is not None:
            raise PocketError("--no-quant asks for float weights, and --bits or --recipe asks for quantized ones.", "Give one or the other.")
        values["bits"] = None
    return target.settings_type(**values)


def _takes_no_bits(target: ConversionTarget) -> bool:
    """Whether the target's `bits` field admits None (the annotation is a string under postponed evaluation)."""
    bits = next((field for field in fields(target.settings_type) if field.name == "bits"), None)
    return bits is not None and "None" in str(bits.type)


def _source(store: ModelStore, query: str) -> LocalModel:
    """The model to convert; one found by a path the store does not know is imported first, so the result's lineage
    names a parent `pocketlm info` can show."""
    from pocketlm.models.errors import PocketError
    from pocketlm.models.model_reference import find_model, is_registered

    model = find_model(store, query)
    if is_registered(model):
        return model
    existing = store.get(model.name)
    if existing is not None:
        raise PocketError(f"There is already a model named {model.name!r} ({existing.path}).",
                          f"Import {model.path} under another name first (`pocketlm import PATH --name NAME`), then convert that.")  # fmt: skip
    return store.register(model.path, source=f"import:{model.path}", name=model.name)


def _run(store: ModelStore, source: LocalModel, target_format: str, options: object, name: str | None, output: Path | None,
         verify: bool = True) -> None:  # fmt: skip
    from rich.console import Console

    from pocketlm.app.interrupts import ctrl_c_sets, in_worker
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.converters.conversion_job import convert_model
    from pocketlm.models.errors import Cancelled
    from pocketlm.models.fit import human_bytes

    cancel = options.cancel  # type: ignore[attr-defined]
    try:
        with ctrl_c_sets(cancel), rich_progress(Console(stderr=True), unit="items") as show_progress:
            model = in_worker(lambda: convert_model(store, source, target_format, options, show_progress, name=name, output=output), cancel)  # type: ignore[arg-type]
    except Cancelled:
        raise Cancelled("Conversion interrupted; nothing was written.") from None
    click.echo(f"{model.name} is ready ({human_bytes(model.size_bytes)}, {model.lineage} of {source.name}, at {model.path}): pocketlm chat {model.name}")
    if verify:
        _verify(store, model, options.threads)  # type: ignore[attr-defined]


def _verify(store: ModelStore, model: LocalModel, threads: int | None) -> None:
    """Verify the result against its source (small models): the verdict, or one line saying why not and how to later.
    A broken result is kept for the user to look at, and said so, but the command fails (exit 1) as `verify` would:
    a script must not carry on with it."""
    from rich.console import Console

    from pocketlm.app import exit_codes
    from pocketlm.app.cli_verify import echo_verdict
    from pocketlm.app.interrupts import ctrl_c_sets, in_worker
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.app.verification import verify_after_convert
    from pocketlm.backends.base import LoadOptions

    cancel = threading.Event()
    with ctrl_c_sets(cancel), rich_progress(Console(stderr=True), unit="items") as show_progress:
        outcome = in_worker(lambda: verify_after_convert(store, model, LoadOptions(threads=threads), cancel, show_progress), cancel)
    if outcome.record is None:
        click.echo(outcome.note)
        return
    echo_verdict(outcome.record)
    if outcome.record.broken:
        click.secho(f"{model.name} is kept at {model.path} for you to look at, but its verdict is broken.", fg="red")
        click.get_current_context().exit(exit_codes.ERROR)


@click.command()
@click.argument("model")
@click.option("--to", "target", type=_TargetChoice(), default="gguf", show_default=True, cls=_TargetOption)
@click.option("--outtype", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]),
              help="GGUF: the type written from the checkpoint; auto (the default) is bf16 for a bf16 checkpoint, else f16.")
@click.option("--quant", help=f"GGUF: then quantize to this type: {QUANT_HELP}.")
@click.option("--imatrix", metavar="TEXT|builtin|FILE.gguf", help="GGUF: importance matrix computed from a calibration text file (or pocketlm's built-in one), or read from llama-imatrix's output.")
@click.option("--bits", type=int, help="GPTQ and MLX: bits per weight (default 4; GPTQ also 8 if the converter offers it; MLX 2, 3, 4, 5, 6 or 8).")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "-1"]), help="GPTQ and MLX: weights sharing one scale (default GPTQ 128, MLX 64; -1, GPTQ only: one per column).")
@click.option("--act-order/--no-act-order", default=None, help="GPTQ: quantize columns by decreasing activation (desc_act; default off).")
@click.option("--calibration", metavar="TEXT|builtin", help="GPTQ: calibration text file (default: pocketlm's built-in text).")
@click.option("--dtype", type=click.Choice(DTYPES), help="MLX: the float type of unquantized weights, scales and biases (default float16), as mlx_lm.convert --dtype.")
@click.option("--recipe", type=click.Choice(RECIPES), help="MLX: one of mlx-lm's mixed-bit recipes (mlx_lm.convert --quant-predicate), e.g. mixed_3_6: 6 bits for the sensitive layers, 3 for the rest; replaces --bits.")
@click.option("--no-quant", is_flag=True, help="MLX: keep every weight in --dtype, unquantized (what mlx_lm.convert does without -q); MLX quantizes to 4 bits otherwise.")
@click.option("--name", help="Store name of the result (default: MODEL's name with the output's type, e.g. NAME:Q4_K_M).")
@click.option("--output", type=click.Path(path_type=Path), help="Write the result here (a file, or a folder for folder formats; a folder for a file output means inside it) instead of pocketlm's models folder. It is registered all the same.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for quantizing (default: physical cores).")
@_NO_VERIFY
def convert(model: str, target: str, outtype: str | None, quant: str | None, imatrix: str | None, bits: int | None, group_size: str | None,
            act_order: bool | None, calibration: str | None, dtype: str | None, recipe: str | None, no_quant: bool, name: str | None,
            output: Path | None, threads: int | None, no_verify: bool) -> None:  # fmt: skip
    """Convert MODEL (a Hugging Face checkpoint: a store name, a unique prefix, or its folder) to another format, and
    optionally quantize it; a GGUF can be quantized too.

    The result is registered with its lineage: `pocketlm info` shows where it came from. A small model's result is
    then verified against MODEL (`pocketlm verify`) unless --no-verify is given.
    """
    from pocketlm.app.cli_models import _store
    from pocketlm.converters.base import ConvertOptions
    from pocketlm.converters.quant_types import quant_type

    chosen = _target(target)
    given = {"outtype": outtype, "quant": quant, "imatrix": imatrix, "bits": bits, "group_size": None if group_size is None else int(group_size),
             "act_order": act_order, "calibration": calibration, "dtype": dtype, "recipe": recipe}  # fmt: skip
    settings = _settings(chosen, given, no_quant)
    if quant:
        quant_type(quant)  # an unknown type fails before any work
    store = _store()
    _run(store, _source(store, model), chosen.format, ConvertOptions(settings=settings, threads=threads), name, output, verify=not no_verify)


@click.command()
@click.argument("model")
@click.argument("quant", metavar="TYPE")
@click.option("--imatrix", metavar="TEXT|builtin|FILE.gguf", help="Importance matrix: a calibration text (needs the checkpoint in the store), `builtin`, or llama-imatrix's output.")
@click.option("--name", help="Store name of the result (default: MODEL's name with TYPE, e.g. NAME:Q4_K_M).")
@click.option("--output", type=click.Path(path_type=Path), help="Write the GGUF here (a file, or a folder to put it in) instead of pocketlm's models folder. It is registered all the same.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads (default: physical cores).")
@_NO_VERIFY
def quantize(model: str, quant: str, imatrix: str | None, name: str | None, output: Path | None, threads: int | None, no_verify: bool) -> None:
    """Quantize MODEL (an f16, bf16 or f32 GGUF: a store name, a unique prefix, or its path) to TYPE.

    TYPE is one of the types `pocketlm convert --help` lists; Q4_K_M is the usual choice. A small model's result is
    then verified against MODEL (`pocketlm verify`) unless --no-verify is given.
    """
    from pocketlm.app.cli_models import _store
    from pocketlm.converters.base import ConvertOptions
    from pocketlm.converters.gguf_settings import GGUFSettings
    from pocketlm.converters.quant_types import quant_type

    quant_type(quant)
    store = _store()
    options = ConvertOptions(settings=GGUFSettings(quant=quant, imatrix=imatrix), threads=threads)
    _run(store, _source(store, model), "gguf", options, name, output, verify=not no_verify)
