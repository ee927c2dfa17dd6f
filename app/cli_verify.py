"""`pocketlm verify`: does a converted model still compute what the model it came from did? Heavy imports stay inside."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from pocketlm.backends.base import LoadOptions
    from pocketlm.models.store import LocalModel, ModelStore
    from pocketlm.models.verification_record import VerificationRecord

def echo_verdict(record: VerificationRecord) -> None:
    """The verdict (in its colour: app/verification.py's LEVEL_LOOKS), the figures, and for broken what to do."""
    from pocketlm.app.verification import LEVEL_LOOKS, text_name

    look = LEVEL_LOOKS[record.level]
    headline = f"{record.model}: {look.headline} against {record.reference}"
    click.secho(headline, fg=look.colour, bold=True) if look.colour else click.echo(headline)
    click.echo(f"  {record.summary}")
    click.echo(f"  {record.scored_tokens} tokens of {text_name(record)} scored by both")
    if record.advice:
        click.secho(f"  {record.advice}", fg=look.colour)


def run_verification(store: ModelStore, model: LocalModel, reference: LocalModel, text: Path | None, options: LoadOptions) -> VerificationRecord:
    """verify_model with a progress bar on stderr, Ctrl-C cancelling it cleanly."""
    from rich.console import Console

    from pocketlm.app.interrupts import ctrl_c_sets, in_worker
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.app.verification import verify_model

    cancel = threading.Event()
    with ctrl_c_sets(cancel), rich_progress(Console(stderr=True), unit="items") as show_progress:
        return in_worker(lambda: verify_model(store, model, reference, text, options, cancel, show_progress), cancel)


@click.command()
@click.argument("model")
@click.option("--against", metavar="REFERENCE", help="Compare with this model (a name, a prefix or a path) instead of MODEL's lineage parent.")
@click.option("--text", "text_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Score this UTF-8 text (its first tokens, up to 512) instead of pocketlm's built-in prose.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for each model (default: physical cores).")
@click.pass_context
def verify(ctx: click.Context, model: str, against: str | None, text_file: Path | None, threads: int | None) -> None:
    """Check that MODEL (a conversion: a store name, a unique prefix or a path) still computes what its source did.

    Both score the same text: the tokens must be identical id for id, and the next-token predictions close (top-1
    agreement, KL divergence, perplexity). The verdict is kept with the model (`pocketlm info` shows it); the exit
    code is 1 when the conversion is broken.
    """
    from pocketlm.app import exit_codes
    from pocketlm.app.cli_models import _store
    from pocketlm.app.verification import reference_for
    from pocketlm.backends.base import LoadOptions
    from pocketlm.models.model_reference import find_model, is_registered

    store = _store()
    found = find_model(store, model)
    reference = reference_for(store, found, against)
    record = run_verification(store, found, reference, text_file, LoadOptions(threads=threads))
    echo_verdict(record)
    if not is_registered(found):
        click.echo(f"  Not kept: {found.path} is not in the store (`pocketlm import` adds it).")
    if record.broken:
        ctx.exit(exit_codes.ERROR)
