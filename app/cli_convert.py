"""`pocketlm convert` and `pocketlm quantize`. Heavy imports stay inside each command."""

from __future__ import annotations

from pathlib import Path

import click

from pocketlm.converters.quant_types import QUANT_TYPES

# The quantizer's own table, so the help never lists a type it lacks (importing it loads no engine).
QUANT_HELP = ", ".join(QUANT_TYPES)


def _source(store, query: str):  # type: ignore[no-untyped-def]
    """A stored model, or a path to a checkpoint folder or GGUF file (registered as an import first)."""
    candidate = Path(query).expanduser()
    if candidate.exists():
        resolved = candidate.absolute()
        existing = next((m for m in store.list() if m.path == resolved), None)
        return existing or store.register(resolved, source=f"import:{resolved}")
    return store.resolve(query)


def _run(store, source, options) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    from pocketlm.app.interrupts import ctrl_c_sets, in_worker
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.converters.conversion_job import convert_model
    from pocketlm.models.errors import Cancelled
    from pocketlm.models.fit import human_bytes

    try:
        with ctrl_c_sets(options.cancel), rich_progress(Console(stderr=True), unit="tensors") as show_progress:
            model = in_worker(lambda: convert_model(store, source, options, show_progress), options.cancel)
    except Cancelled:
        raise Cancelled("Conversion interrupted; nothing was written.") from None
    click.echo(f"{model.name} is ready ({human_bytes(model.size_bytes)}, {model.lineage} of {source.name}): pocketlm chat {model.name}")


@click.command()
@click.argument("model")
@click.option("--to", "target", type=click.Choice(["gguf"]), default="gguf", show_default=True, help="Target format.")
@click.option("--outtype", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]), default="auto", show_default=True,
              help="GGUF written from the checkpoint; auto is bf16 for a bf16 checkpoint, else f16.")
@click.option("--quant", help=f"Then quantize to this type: {QUANT_HELP}.")
@click.option("--imatrix", metavar="TEXT|builtin|FILE.gguf", help="Importance matrix: computed from a calibration text file (or pocketlm's built-in one), or read from llama-imatrix's output.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for quantizing (default: physical cores).")
def convert(model: str, target: str, outtype: str, quant: str | None, imatrix: str | None, threads: int | None) -> None:
    """Convert MODEL (a Hugging Face checkpoint in the store, or its folder) to GGUF, and optionally quantize it.

    The result is registered with its lineage: `pocketlm info` shows where it came from.
    """
    from pocketlm.app.cli_models import _store
    from pocketlm.converters.base import ConvertOptions
    from pocketlm.converters.quant_types import quant_type

    if quant:
        quant_type(quant)  # an unknown type fails before any work
    store = _store()
    _run(store, _source(store, model), ConvertOptions(outtype=outtype, quant=quant, imatrix=imatrix, threads=threads))


@click.command()
@click.argument("model")
@click.argument("quant", metavar="TYPE")
@click.option("--imatrix", metavar="TEXT|builtin|FILE.gguf", help="Importance matrix: a calibration text (needs the checkpoint in the store), `builtin`, or llama-imatrix's output.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads (default: physical cores).")
def quantize(model: str, quant: str, imatrix: str | None, threads: int | None) -> None:
    """Quantize MODEL (an f16, bf16 or f32 GGUF in the store, or its path) to TYPE.

    TYPE is one of the types `pocketlm convert --help` lists; Q4_K_M is the usual choice.
    """
    from pocketlm.app.cli_models import _store
    from pocketlm.converters.base import ConvertOptions
    from pocketlm.converters.quant_types import quant_type

    quant_type(quant)
    store = _store()
    _run(store, _source(store, model), ConvertOptions(quant=quant, imatrix=imatrix, threads=threads))
