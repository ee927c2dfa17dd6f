"""`pocketlm adapter import|ls|rm|convert`: LoRA adapters in the store. Heavy imports stay inside each command."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pocketlm.app.interrupts import ctrl_c_sets, in_worker
from pocketlm.models.formats import ModelFormat

if TYPE_CHECKING:
    from pocketlm.models.store import LocalModel, ModelStore

# `--to` as users say it, and the adapter format each makes.
CONVERT_TARGETS = {"gguf": ModelFormat.GGUF_LORA, "mlx": ModelFormat.MLX_LORA}


def _store() -> ModelStore:
    from pocketlm.app.cli_models import _store

    return _store()


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def _base_model(store: ModelStore, query: str | None) -> LocalModel | None:
    """The model --base names (a store name, a prefix or a path); an adapter named there is refused."""
    from pocketlm.models.errors import PocketError
    from pocketlm.models.model_reference import find_model

    if query is None:
        return None
    base = find_model(store, query)
    if base.is_adapter:
        raise PocketError(f"{base.name} is an adapter; --base names the model the adapter was trained for.", "Give a name from `pocketlm ls`.")
    return base


@click.group()
def adapter() -> None:
    """LoRA adapters: import PEFT adapters, list, convert and remove them. Attach one with `chat --adapter NAME[:SCALE]`."""


@adapter.command(name="import")
@click.argument("source", metavar="PATH_OR_REPO")
@click.option("--name", help="Name in the store (default: the folder or file name, or the repo id).")
@click.option("--base", "base_query", metavar="MODEL", help="The stored model it is for (default: the one its base_model_name_or_path names, if stored); it is checked against it.")
def import_adapter(source: str, name: str | None, base_query: str | None) -> None:
    """Register a LoRA adapter: a PEFT folder (adapter_config.json + adapter_model.safetensors), an mlx-lm adapter
    folder or a GGUF LoRA file (which stay where they are), or a Hub repo holding a PEFT adapter (pulled into the HF
    cache). A PEFT adapter is read whole and checked against its base model before it is registered."""
    from pocketlm.app.adapter_import import register_adapter
    from pocketlm.models.fit import human_bytes

    store = _store()
    base = _base_model(store, base_query)
    path = Path(source).expanduser()
    if path.exists():
        model = register_adapter(store, path, source=f"import:{path.absolute()}", name=name, base=base)
    else:
        model = _import_from_hub(store, source, name, base)
    what = ", ".join(filter(None, [model.format, model.quantization, human_bytes(model.size_bytes)]))
    on = f" for {model.base_model}" if model.base_model else ""
    base_name = model.base_model if store.get(model.base_model) is not None else "MODEL"
    click.echo(f"Imported adapter {model.name} ({what}){on}: pocketlm chat {base_name} --adapter {model.name}")


def _import_from_hub(store: ModelStore, spec: str, name: str | None, base: LocalModel | None) -> LocalModel:
    """Pull the adapter repo `spec` (the pull machinery: cache, resume, checksums), then check and register it."""
    from rich.markup import escape
    from rich.text import Text

    from pocketlm.app.adapter_import import adopt_pulled, refuse_model_repo
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.models.errors import Cancelled, PocketError
    from pocketlm.models.fit import human_bytes
    from pocketlm.models.model_reference import looks_like_path
    from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull

    if looks_like_path(spec):
        raise PocketError(f"{spec} does not exist.", "Check the path to the adapter's folder or .gguf file.")
    console = _console()
    cancel = threading.Event()
    with ctrl_c_sets(cancel):
        with console.status(Text(f"Looking up {spec} on the Hub…")):
            stopped = Cancelled(f"Import of {spec} stopped during the lookup; nothing was downloaded.")
            plan = in_worker(lambda: plan_pull(parse_pull_spec(spec)), cancel, abandon_with=stopped)
        refuse_model_repo(plan)  # before a byte is downloaded
        console.print(f"[bold]{escape(plan.name)}[/bold] ({human_bytes(plan.total_bytes)}{', from the local cache' if plan.repo.from_cache else ''})")
        try:
            with rich_progress(console) as show_progress:
                pulled = in_worker(lambda: run_pull(plan, store, show_progress, cancel), cancel)
        except Cancelled:
            raise Cancelled(f"Import of {plan.name} interrupted; what was downloaded is kept.", f"Run `pocketlm adapter import {spec}` again to resume.") from None
    return adopt_pulled(store, pulled, name, base)


@adapter.command(name="ls")
def list_adapters() -> None:
    """List the stored adapters, their base models and the conversions pocketlm made of them."""
    from rich.table import Table
    from rich.text import Text

    from pocketlm.app.adapter_loading import conversions_of, stored_adapters
    from pocketlm.app.cli_models import _stdout_console
    from pocketlm.app.model_details import origin
    from pocketlm.models.fit import human_bytes

    store = _store()
    adapters = stored_adapters(store)
    if not adapters:
        click.echo("No adapters yet. Import one with `pocketlm adapter import PATH_OR_REPO`.")
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("Name", no_wrap=True)
    for column, justify in (("Format", "left"), ("Rank", "left"), ("Base model", "left"), ("Size", "right"), ("Origin", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for model in adapters:
        cells = (model.name, model.format, model.quantization, model.base_model or "?", human_bytes(model.size_bytes), origin(model))
        table.add_row(*map(Text, cells))  # Text: names are the user's, never markup
        for converted in conversions_of(store, model):
            cells = (f"  └ {converted.name}", converted.format, converted.quantization, converted.base_model or "?", human_bytes(converted.size_bytes),
                     converted.lineage or "converted")  # fmt: skip
            table.add_row(*map(Text, cells), style="dim")
    _stdout_console().print(table)


@adapter.command(name="rm")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def remove_adapter(name: str, yes: bool) -> None:
    """Remove the adapter NAME and the conversions pocketlm made of it; files pocketlm did not fetch or write stay."""
    from pocketlm.app.adapter_loading import conversions_of, find_adapter
    from pocketlm.models.errors import PocketError
    from pocketlm.models.fit import human_bytes
    from pocketlm.models.removal import plan_removal, remove_model

    store = _store()
    found = find_adapter(store, name)
    doomed = [*conversions_of(store, found), found]  # the conversions first: never one whose parent is gone
    plans = [plan_removal(store, model) for model in doomed]
    freed = sum(plan.freed_bytes for plan in plans)
    question = f"Remove adapter {found.name}"
    if len(doomed) > 1:
        question += f" and its {len(doomed) - 1} conversion{'s' if len(doomed) > 2 else ''}"
    question += f", deleting {human_bytes(freed)} pocketlm wrote or fetched?" if freed else "? (its files stay where they are)"
    if not yes:
        if not sys.stdin.isatty():
            raise PocketError(f"Not removing {found.name} without confirmation.", "Pass --yes to remove it from a script.")
        if not click.confirm(question, default=False):
            click.echo("Nothing removed.")
            return
    for model in doomed:
        remove_model(store, model)
    what = f"adapter {found.name}" + (f" and {len(doomed) - 1} conversion{'s' if len(doomed) > 2 else ''} of it" if len(doomed) > 1 else "")
    freed_text = f", freed {human_bytes(freed)}" if freed else ""
    kept = "; the adapter's own files stay where they are (pocketlm did not fetch them)" if plans[-1].kept_not_owned else ""
    click.echo(f"Removed {what}{freed_text}{kept}.")


@adapter.command(name="convert")
@click.argument("name")
@click.option("--to", "target", type=click.Choice(sorted(CONVERT_TARGETS)), required=True, help="gguf: a GGUF LoRA for llama.cpp; mlx: an mlx-lm adapter.")
@click.option("--base", "base_query", metavar="MODEL", required=True, help="The model it is for (a GGUF LoRA follows its base's tensor names and row order).")
@click.option("--name", "output_name", help="Store name of the result (default: NAME:FORMAT@BASE, the name chat reuses).")
@click.option("--output", metavar="PATH", help="Write it here (a .gguf path or a folder for --to gguf; a folder for --to mlx) instead of pocketlm's models folder. It is registered all the same.")
def convert_adapter(name: str, target: str, base_query: str, output_name: str | None, output: str | None) -> None:
    """Convert the PEFT adapter NAME for a backend: to a GGUF LoRA (llama.cpp) or an mlx-lm adapter, for the model
    --base names. `chat --adapter` does this by itself when needed; this writes it where you want it."""
    from rich.console import Console

    from pocketlm.app import adapter_loading
    from pocketlm.app.model_loading import ModelChoice
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.converters.conversion_job import file_name_for
    from pocketlm.models.errors import Cancelled, PocketError
    from pocketlm.models.fit import human_bytes

    store = _store()
    found = adapter_loading.find_adapter(store, name)
    if found.format != ModelFormat.PEFT_LORA:
        raise PocketError(f"{found.name} is a {found.format} adapter; pocketlm converts PEFT adapters only.", "Import the adapter's PEFT folder and convert that.")
    base = _base_model(store, base_query)
    assert base is not None
    choice = ModelChoice(base.name, base.path, base.format)
    adapter_loading.check_fits(found, choice)
    target_format = CONVERT_TARGETS[target]
    output_name = output_name or adapter_loading.conversion_name(found, target_format, choice)
    destination = _output_path(output, target, file_name_for(output_name))
    cancel = threading.Event()
    made = _first_missing(destination.parent) if destination is not None else None  # made by the write; removed if it fails
    try:
        with ctrl_c_sets(cancel), rich_progress(Console(stderr=True), unit="items") as show_progress:
            converted = in_worker(lambda: adapter_loading.convert_adapter(store, found, target_format, choice, show_progress, cancel,
                                                                         name=output_name, output=destination), cancel)  # fmt: skip
    except BaseException as error:
        _remove_empty(made, destination)
        if isinstance(error, Cancelled):
            raise Cancelled("Conversion interrupted; nothing was written.") from None
        raise
    click.echo(f"{converted.name} is ready ({human_bytes(converted.size_bytes)}, {converted.lineage}, at {converted.path}): "
               f"pocketlm chat {base.name} --adapter {found.name}")  # fmt: skip


def _output_path(output: str | None, target: str, file_name: str) -> Path | None:
    """Where --output says the result goes, checked before anything is made (a refused conversion leaves no folder).
    For a GGUF: a path ending in .gguf is the file; an existing folder, or a path ending in a slash, is the folder to
    write `file_name` in (made when the file is written); anything else is refused. For MLX: a folder, never a file."""
    from pocketlm.models.errors import PocketError

    if output is None:
        return None
    path = Path(output).expanduser().absolute()
    as_folder = output.endswith(("/", "\\"))
    if path.exists() and not path.is_dir() and (target != "gguf" or path.suffix.lower() != ".gguf" or as_folder):
        raise PocketError(f"{output} is a file, and --to {target} writes {'a .gguf file or into a folder' if target == 'gguf' else 'a folder'}.",
                          "Give --output a path that does not hold anything else.")  # fmt: skip
    if target != "gguf":
        return path
    if path.is_dir() or as_folder:
        return path / file_name
    if path.suffix.lower() != ".gguf":
        raise PocketError(f"{output} names neither a .gguf file nor a folder.", "Give --output a path ending in .gguf, or a folder (an existing one, or one ending in /).")
    return path


def _first_missing(folder: Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist yet (what writing into `folder` will create)."""
    missing = None
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def _remove_empty(made: Path | None, destination: Path | None) -> None:
    """The folders a failed conversion created for its output, removed again while empty: it leaves nothing behind."""
    if made is None or destination is None:
        return
    folder = destination.parent
    while folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        if folder == made:
            break
        folder = folder.parent
