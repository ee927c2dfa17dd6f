"""The model commands: search, pull, ls, info, rm, import. Heavy imports stay inside each command."""

from __future__ import annotations

import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pocketlm.app.interrupts import ctrl_c_sets, in_worker

if TYPE_CHECKING:
    from pocketlm.backends.remote import RemoteModelInfo
    from pocketlm.models.store import LocalModel, ModelStore

_LABEL_WIDTH = 16  # `info`'s widest usual label is 14 characters ("Context length")


def _store() -> ModelStore:
    from pocketlm.models.locations import database_path
    from pocketlm.models.store import ModelStore

    return ModelStore(database_path())


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console():  # type: ignore[no-untyped-def]
    """Tables for people at their terminal's width; piped into a script or a file, wide enough never to cut a name."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=250)


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "?"
    days = (datetime.now(timezone.utc) - moment).days
    return "today" if days < 1 else f"{days} days ago" if days < 60 else moment.strftime("%Y-%m-%d")


@click.command()
@click.argument("query", required=False, default="")
@click.option("--format", "model_format", type=click.Choice(["gguf", "mlx", "gptq", "safetensors"]), help="Only repos with this format.")
@click.option("--sort", type=click.Choice(["downloads", "likes", "updated"]), default="downloads", show_default=True)
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
def search(query: str, model_format: str | None, sort: str, limit: int) -> None:
    """Search the Hugging Face Hub for models matching QUERY."""
    from rich.table import Table
    from rich.text import Text

    from pocketlm.models.fit import human_bytes
    from pocketlm.models.hub import search_models

    with _console().status(Text(f"Searching the Hub for {query!r}…")):
        results = search_models(query, model_format, sort, limit)  # type: ignore[arg-type]
    if not results:
        click.echo(f"No models on the Hub match {query!r}" + (f" in {model_format} format." if model_format else "."))
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("Model", no_wrap=True)
    for column, justify in (("Downloads", "right"), ("Likes", "right"), ("Updated", "left"), ("Formats", "left"), ("Quants", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for result in results:
        quants = " · ".join(f"{c.quant} {human_bytes(c.size_bytes)}" for c in result.gguf_files)
        name = result.repo_id + (" (gated)" if result.gated else "")
        cells = (name, f"{result.downloads:,}", f"{result.likes:,}", _ago(result.last_modified), ", ".join(result.formats), quants)
        table.add_row(*map(Text, cells))  # Text: repo and file names are the Hub's, never markup
    _stdout_console().print(table)
    click.echo("Pull one with: pocketlm pull OWNER/NAME[:QUANT]", err=True)


@click.command()
@click.argument("spec", metavar="REPO[@REVISION][:QUANT_OR_FILE]")
@click.option("--allow-pickle", is_flag=True, help="Also fetch pickle weights (*.bin) when a repo has no safetensors. Pickles can run code.")
@click.option("--output", type=click.Path(path_type=Path), help="Put the model here instead of the Hugging Face cache (a .gguf path, or a folder); it is still registered.")
def pull(spec: str, allow_pickle: bool, output: Path | None) -> None:
    """Download a model from the Hugging Face Hub into the shared HF cache and register it.

    A GGUF repo gets one quant (`:Q4_K_M`; by default Q4_K_M or the nearest); a checkpoint repo gets its config,
    tokenizer and safetensors weights. An interrupted pull resumes where it stopped.
    """
    from rich.markup import escape
    from rich.text import Text

    from pocketlm.app.progress_view import rich_progress
    from pocketlm.models.errors import Cancelled
    from pocketlm.models.fit import human_bytes
    from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull

    console = _console()
    cancel = threading.Event()
    with ctrl_c_sets(cancel):
        with console.status(Text(f"Looking up {spec} on the Hub…")):  # Text: what the user typed, never markup
            # The lookup writes nothing: a Ctrl-C leaves it to finish (or time out) on its own.
            stopped = Cancelled(f"Pull of {spec} stopped during the lookup; nothing was downloaded.")
            plan = in_worker(lambda: plan_pull(parse_pull_spec(spec), allow_pickle), cancel, abandon_with=stopped)
        what = f"{len(plan.files)} file{'s' if len(plan.files) > 1 else ''}, {human_bytes(plan.total_bytes)}"
        # Escaped: repo and file names are the Hub's, and rich parses a printed str as markup.
        console.print(f"[bold]{escape(plan.name)}[/bold] ({what}{', from the local cache' if plan.repo.from_cache else ''})")
        if plan.other_quants:
            console.print("[dim]Also available: " + escape(", ".join(f"{c.quant} ({human_bytes(c.size_bytes)})" for c in plan.other_quants)) + "[/dim]")
        store = _store()
        try:
            with rich_progress(console) as show_progress:
                model = in_worker(lambda: run_pull(plan, store, show_progress, cancel, output), cancel)
        except Cancelled:
            raise Cancelled(f"Pull of {plan.name} interrupted; what was downloaded is kept.", f"Run `pocketlm pull {spec}` again to resume.") from None
    click.echo(f"{model.name} is ready ({model.format}, {human_bytes(model.size_bytes)}): pocketlm chat {model.name}")


@click.command(name="ls")
def list_models() -> None:
    """List the models in the local store, each with the LoRA adapters for it beneath it."""
    from rich.table import Table
    from rich.text import Text

    from pocketlm.app.adapter_loading import adapters_by_base, stored_adapters
    from pocketlm.app.model_details import origin, parameters
    from pocketlm.models.fit import human_bytes

    store = _store()
    everything = store.list()
    models = [m for m in everything if not m.is_adapter]
    adapters = stored_adapters(store)  # an adapter's conversions are `adapter ls`'s business
    if not models and not adapters:
        click.echo("No models yet. Try `pocketlm starter`, `pocketlm pull OWNER/NAME` or `pocketlm import PATH`.")
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("Name", no_wrap=True)
    for column, justify in (("Format", "left"), ("Arch", "left"), ("Params", "right"), ("Quant", "left"), ("Size", "right"), ("Origin", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    under = adapters_by_base(store, everything)
    for m in models:
        cells = (m.name, m.format, m.architecture, parameters(m.parameter_count), m.quantization, human_bytes(m.size_bytes), origin(m))
        table.add_row(*map(Text, cells))  # Text: a str cell is parsed as markup, and names are the user's
        for a in under.get(m.name, []):
            cells = (f"  + {a.name}", a.format, "LoRA", parameters(a.parameter_count), a.quantization, human_bytes(a.size_bytes), origin(a))
            table.add_row(*map(Text, cells), style="dim")
    placed = {a.name for group in under.values() for a in group}
    for a in (a for a in adapters if a.name not in placed):  # a base the store does not hold
        base = f"LoRA for {a.base_model}" if a.base_model else "LoRA"
        cells = (a.name, a.format, base, parameters(a.parameter_count), a.quantization, human_bytes(a.size_bytes), origin(a))
        table.add_row(*map(Text, cells), style="dim")
    _stdout_console().print(table)


@click.command()
@click.argument("model")
def info(model: str) -> None:
    """Show MODEL's metadata, files, lineage, and whether it fits this machine's memory.

    MODEL is a name from `pocketlm ls`, a unique prefix of one, or a model file or folder path.
    """

    from pocketlm.app.model_details import detail_rows, device_of
    from pocketlm.models.fit import human_bytes
    from pocketlm.models.model_reference import find_model, is_registered
    from pocketlm.models.remote_endpoints import REMOTE_FORMAT

    store = _store()
    found = find_model(store, model)
    if found.format == REMOTE_FORMAT:
        _print_rows([("Name", found.name), *_remote_info(store, found)])
        return
    # With the device: which backend opens it and where ("mlx on CPU (float32), 2 cores"); asking may import torch or
    # mlx, which a command that prints once can afford (the app asks from a worker).
    rows = detail_rows(store, found, device=device_of)  # a GPTQ model's bits, group size and act-order come from there, once
    if not is_registered(found):
        rows.append(("Store", "not in the store (`pocketlm import` adds it)"))
    _print_rows(rows)
    click.echo("Files:")
    for path in found.files:
        try:
            size = human_bytes(path.stat().st_size)
        except OSError:
            size = "MISSING"
        click.echo(f"  {size:>9}  {path}")


def _print_rows(rows: list[tuple[str, str]]) -> None:
    from pocketlm.app.model_details import Alarming

    # Values line up after the usual labels; a longer one ("Opens by default with") runs past them rather than
    # pushing every value to the right.
    width = max(len(label) for label, _ in rows if len(label) <= _LABEL_WIDTH)
    for label, value in rows:
        click.secho(f"{label:<{width}}  {value}", fg="red" if isinstance(value, Alarming) else None)  # a broken conversion's verdict


def _remote_info(store: ModelStore, found: LocalModel) -> list[tuple[str, str]]:
    """A remote endpoint's details: one GET /v1/models for what it serves; unreachable is a sentence among them."""
    from pocketlm.app.model_details import remote_rows
    from pocketlm.backends.remote import list_remote_models
    from pocketlm.models.errors import PocketError
    from pocketlm.models.remote_endpoints import RemoteEndpoints, parse_remote_reference

    endpoint_name, model = parse_remote_reference(found.path)
    endpoints = RemoteEndpoints(store.database)
    try:
        endpoint = endpoints.require(endpoint_name)
    finally:
        endpoints.close()
    try:
        served: list[RemoteModelInfo] | PocketError = list_remote_models(endpoint)
    except PocketError as error:
        served = error
    return remote_rows(endpoint, model, served)


@click.command()
@click.argument("model")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def rm(model: str, yes: bool) -> None:
    """Remove MODEL (a name, a unique prefix, or its file or folder path): unregister it and delete the files pocketlm
    fetched or made for it, unless another model uses them."""
    from pocketlm.models.errors import PocketError
    from pocketlm.models.fit import human_bytes
    from pocketlm.models.model_reference import find_model, is_registered
    from pocketlm.models.remote_endpoints import REMOTE_FORMAT, parse_remote_reference
    from pocketlm.models.removal import plan_removal, remove_model

    store = _store()
    found = find_model(store, model)
    if found.format == REMOTE_FORMAT:
        endpoint, _ = parse_remote_reference(found.path)
        raise PocketError(f"{model} is a remote endpoint's model, not a stored one: there are no files to remove.",
                          f"Forget the endpoint with `pocketlm remote rm {endpoint}`.")  # fmt: skip
    if not is_registered(found):
        raise PocketError(f"{model} is not in the store, so there is nothing to remove.", "Delete the files yourself if you no longer want them.")
    removal = plan_removal(store, found)
    summary = removal.summary(found.name)
    if not yes:
        if not sys.stdin.isatty():
            raise PocketError(f"Not removing {found.name} without confirmation.", "Pass --yes to remove it from a script.")
        if not click.confirm(summary, default=False):
            click.echo("Nothing removed.")
            return
    remove_model(store, found)
    if removal.deleted:
        click.echo(f"Removed {found.name}, freed {human_bytes(removal.freed_bytes)}.")
    elif removal.kept_not_owned:
        click.echo(f"Removed {found.name} from the store; its files stay where they are (pocketlm did not fetch them).")
    elif removal.missing and not removal.kept_shared:
        click.echo(f"Removed {found.name} from the store; its files were already gone.")
    else:
        click.echo(f"Removed {found.name}; its files stay, other models use them.")


@click.command(name="import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Name in the store (default: the file or folder name).")
def import_model(path: Path, name: str | None) -> None:
    """Register a local GGUF file or Hugging Face model folder (the files stay where they are)."""
    from pocketlm.models.errors import PocketError
    from pocketlm.models.fit import human_bytes

    store = _store()
    resolved = path.expanduser().resolve()
    wanted = name or (resolved.stem if resolved.is_file() else resolved.name)
    existing = store.get(wanted)
    if existing and existing.path != resolved:
        raise PocketError(f"There is already a model named {wanted!r} ({existing.path}).", "Choose another with --name.")
    model = store.register(resolved, source=f"import:{resolved}", name=wanted)
    click.echo(f"Imported {model.name} ({model.format}, {model.architecture}, {human_bytes(model.size_bytes)}).")
