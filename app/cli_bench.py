"""`pocketlm bench`: speed (and, with --ppl, quality) of models across backends, and the history of past runs.

Progress goes to stderr, the table (or --json/--csv/--md) to stdout, so `pocketlm bench MODEL --json > run.json`
keeps only the figures. Heavy imports stay inside the command: `pocketlm --help` must not wait for them.
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime
from typing import TYPE_CHECKING

import click

from pocketlm.app import exit_codes

if TYPE_CHECKING:
    from rich.console import Console

    from pocketlm.app.bench_history import BenchHistory
    from pocketlm.app.bench_run import BenchCell, BenchEvent, BenchResult, BenchRun

_OUTPUTS = {"json": "to_json", "csv": "to_csv", "md": "to_markdown"}


@click.command()
@click.argument("models", nargs=-1)
@click.option("--backend", "backends", metavar="NAME[,NAME...]", help="Backends to measure on (default: every installed one that loads each model).")
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=512, show_default=True, help="Prompt tokens of the pp test (0 skips it).")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=128, show_default=True, help="Generated tokens of the tg test (0 skips it).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True, help="Measured runs of each test, after one warm-up.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: physical cores).")
@click.option("--ppl", "perplexity_file", type=click.Path(dir_okay=False), help="Also measure perplexity on this text file.")
@click.option("--family", metavar="MODEL", help="Bench MODEL and every model converted or quantized from it in the store.")
@click.option("--json", "output", flag_value="json", help="Print llama-bench-style JSON records.")
@click.option("--csv", "output", flag_value="csv", help="Print CSV, one row per model, backend and test.")
@click.option("--md", "output", flag_value="md", help="Print a Markdown table.")
@click.option("--history", "history_id", is_flag=False, flag_value="all", metavar="[ID]",
              help="List past runs, or show run ID (in the chosen format).")  # fmt: skip
def bench(models: tuple[str, ...], backends: str | None, n_prompt: int, n_gen: int, repetitions: int, threads: int | None,
          perplexity_file: str | None, family: str | None, output: str | None, history_id: str | None) -> None:  # fmt: skip
    """Measure prompt processing (pp) and generation (tg) speed of MODEL... on each backend, as llama-bench does.

    Each model × backend runs in its own process, after a warm-up, over -r repetitions: mean ± sd tokens/s, time to
    first token, peak memory and load time, with perplexity beside them when --ppl names a text. Every run is kept:
    `pocketlm bench --history` lists them.
    """
    from pocketlm.app.bench_history import BenchHistory
    from pocketlm.models.locations import database_path

    history = BenchHistory(database_path())
    try:
        if history_id is not None:
            if models or family:
                raise click.UsageError("--history shows past runs; give it no models.")
            _show_history(history, history_id, output)
            return
        if not models and not family:
            raise click.UsageError("Name one or more models to bench, or --family MODEL.")
        run = _run(history, models, backends, n_prompt, n_gen, repetitions, threads, perplexity_file, family, output)
    finally:
        history.close()
    _print_run(run, output)
    if run.results and all(result.failed for result in run.results):
        raise SystemExit(exit_codes.ERROR)


def _run(history: BenchHistory, models: tuple[str, ...], backends: str | None, n_prompt: int, n_gen: int, repetitions: int,
         threads: int | None, perplexity_file: str | None, family: str | None, output: str | None) -> BenchRun:  # fmt: skip
    from rich.console import Console

    from pocketlm.app.bench_run import BenchRequest, RunFinished, run_bench
    from pocketlm.app.interrupts import ctrl_c_sets
    from pocketlm.app.progress_view import rich_progress
    from pocketlm.backends.speed import SpeedSettings
    from pocketlm.models.errors import Cancelled
    from pocketlm.models.locations import database_path
    from pocketlm.models.store import ModelStore

    request = BenchRequest(models=models, backends=tuple(name.strip() for name in (backends or "").split(",") if name.strip()),
                           settings=SpeedSettings(n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions), threads=threads,
                           perplexity_text=perplexity_file, family=family)  # fmt: skip
    console = Console(stderr=True)
    store = ModelStore(database_path())
    cancel = threading.Event()
    finished: RunFinished | None = None
    try:
        with ctrl_c_sets(cancel), rich_progress(console, unit="items") as show_progress:
            render = _ProgressRenderer(console, show_progress)
            for event in run_bench(store, request, history, cancel):
                render(event)
                if isinstance(event, RunFinished):
                    finished = event
    finally:
        store.close()
    assert finished is not None
    if finished.run.id is not None:
        console.print(f"Saved as run {finished.run.id}: `pocketlm bench --history {finished.run.id}` shows it again.", markup=False, highlight=False)
    if finished.cancelled:
        if finished.run.results:
            _print_run(finished.run, output)
        kept = f"the {len(finished.run.results)} finished cells are saved" if finished.run.results else "no cell had finished"
        raise Cancelled(f"The benchmark was cancelled; {kept}.", "Run it again to measure the rest.")
    return finished.run


class _ProgressRenderer:
    """A bar per cell and stage (loading, speed, perplexity) on stderr, and a line per finished cell above them."""

    def __init__(self, console: Console, show_progress) -> None:  # type: ignore[no-untyped-def]
        self.console = console
        self.show_progress = show_progress
        self.position = (0, 0)  # the current cell's index and the number of cells: CellProgress does not carry them

    def __call__(self, event: BenchEvent) -> None:
        from pocketlm.app.bench_run import CellFinished, CellProgress, CellStarted, ModelsSkipped
        from pocketlm.models.progress import ProgressUpdate

        if isinstance(event, ModelsSkipped):
            for reason in event.reasons:
                self.console.print(f"– {reason}", style="yellow", markup=False, highlight=False)
        elif isinstance(event, CellStarted):
            self.position = (event.index, event.total)
            self.show_progress(ProgressUpdate(self._label(event.cell, "loading"), 0, None))
        elif isinstance(event, CellProgress) and event.stage != "starting":
            # The child names each run ("warm-up", "pp 2/5", "tg 2/5"); one bar counts them all.
            stage = "speed" if event.stage.startswith(("pp", "tg", "warm-up")) else event.stage
            self.show_progress(ProgressUpdate(self._label(event.cell, stage), event.done, event.total))
        elif isinstance(event, CellFinished):
            self._finished(event.result)

    def _label(self, cell: BenchCell, stage: str) -> str:
        index, total = self.position
        return f"[{index}/{total}] {cell.model} on {cell.backend}: {stage}"

    def _finished(self, result: BenchResult) -> None:
        from pocketlm.app.bench_report import perplexity_text, spread_text

        where = f"{result.cell.model} on {result.cell.backend}"
        if result.failed or result.speed is None:
            self.console.print(f"✗ {where}: {result.error}", style="red", markup=False, highlight=False)
            return
        spreads = (("pp", result.speed.prompt_speed()), ("tg", result.speed.generation_speed()))
        figures = ", ".join(f"{name} {spread_text(spread)} t/s" for name, spread in spreads if spread)
        if result.perplexity is not None:
            figures += f", PPL {perplexity_text(result.perplexity.value)}"
        self.console.print(f"✓ {where}: {figures}", markup=False, highlight=False)
        if result.perplexity_error:
            self.console.print(f"  perplexity failed: {result.perplexity_error}", style="yellow", markup=False, highlight=False)


def _print_run(run: BenchRun, output: str | None) -> None:
    from pocketlm.app import bench_report

    if output is not None:
        text = getattr(bench_report, _OUTPUTS[output])(run)
        click.echo(text, nl=not text.endswith("\n"))
        return
    _stdout_console().print(bench_report.results_table(run))


def _show_history(history: BenchHistory, history_id: str, output: str | None) -> None:
    from pocketlm.models.errors import PocketError

    if history_id == "all":
        _list_runs(history, output)
        return
    if not history_id.isdigit():
        raise click.UsageError(f"--history takes a run number, not {history_id!r}.")
    run = history.get(int(history_id))
    if run is None:
        raise PocketError(f"There is no benchmark run {history_id}.", "`pocketlm bench --history` lists the runs there are.")
    _print_run(run, output)


def _list_runs(history: BenchHistory, output: str | None) -> None:
    """The past runs (id, date, models, backends, best tg) as a table, or in the chosen format: a JSON list, CSV rows
    or a Markdown table."""
    import csv
    import io
    import json

    from pocketlm.app.bench_report import best_generation_speed, markdown_row

    runs = history.runs()
    listing = [{"id": run.id, "started_at": run.started_at, "models": sorted({r.cell.model for r in run.results}),
                "backends": sorted({r.cell.backend for r in run.results}), "best_tg_ts": best_generation_speed(run)} for run in runs]  # fmt: skip
    if output == "json":
        click.echo(json.dumps(listing, indent=2))
        return
    if not runs and output is None:
        click.echo("No benchmark has run yet: `pocketlm bench MODEL` measures one.", err=True)
        return
    titles = ["id", "date", "models", "backends", "best tg t/s"]
    rows = [[str(entry["id"]), datetime.fromtimestamp(entry["started_at"]).strftime("%Y-%m-%d %H:%M"), ", ".join(entry["models"]),  # type: ignore[arg-type]
             ", ".join(entry["backends"]), f"{entry['best_tg_ts']:.1f}" if entry["best_tg_ts"] else "—"] for entry in listing]  # type: ignore[arg-type]  # fmt: skip
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "started_at", "models", "backends", "best_tg_ts"])
        writer.writerows([entry["id"], entry["started_at"], ";".join(entry["models"]), ";".join(entry["backends"]),  # type: ignore[arg-type]
                          "" if entry["best_tg_ts"] is None else entry["best_tg_ts"]] for entry in listing)  # type: ignore[arg-type]  # fmt: skip
        click.echo(buffer.getvalue(), nl=False)
        return
    if output == "md":
        click.echo("\n".join([markdown_row(titles), markdown_row(["---"] * len(titles)), *map(markdown_row, rows)]))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(*titles)
    for row in rows:
        table.add_row(*(Text(value) for value in row))  # Text: model names are the user's, not markup
    _stdout_console().print(table)


def _stdout_console():  # type: ignore[no-untyped-def]
    """Tables for people at their terminal's width; piped into a script or a file, wide enough never to cut a name."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=250)
