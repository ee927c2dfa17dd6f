"""A bench run's results as a table: one row per model × backend, the same columns and text as bench_report's tables
(speeds as mean ± sd over the repetitions, the engine's own figure beside ours), and a failed cell in red with its
sentence in a last column (in the CLI's table it stands in the first figure's place; here that would widen the figures'
columns past the screen for every row)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widgets import DataTable

from pocketlm.app.bench_report import cell_note, cell_values, columns

if TYPE_CHECKING:
    from pocketlm.app.bench_run import BenchRun


class BenchResults(DataTable[object]):
    def __init__(self, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)

    def show_run(self, run: BenchRun | None) -> None:
        """Show `run`'s cells (None: an empty table); the columns name its tests (pp512, tg128), a skipped one left out."""
        self.clear(columns=True)
        if run is None:
            return
        titles = columns(run)
        notes = [cell_note(result) for result in run.results]
        self.add_columns(*titles, *(["note"] if any(notes) else []))
        for result, note in zip(run.results, notes, strict=True):
            values = [*cell_values(run, result).values(), *([note] if any(notes) else [])]
            # Text, not str: model names and error sentences are the user's, and a str cell is read as markup.
            style = "red" if result.failed else "yellow" if note else ""
            self.add_row(*(Text(value, style=style, no_wrap=True, end="") for value in values))
