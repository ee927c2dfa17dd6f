"""The bench history: one row per saved run (newest first), and a message when one is chosen to be shown again."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from textual import on
from textual.message import Message
from textual.widgets import DataTable

from pocketlm.app.bench_report import best_generation_result
from pocketlm.app.bench_series import cell_labels
from pocketlm.app.widgets.cells import cell

if TYPE_CHECKING:
    from pocketlm.app.bench_run import BenchRun


def run_date(run: BenchRun) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(run.started_at))


def best_generation(run: BenchRun) -> str:
    """The fastest cell's generation speed and its name, "58.2 t/s Q4_K_M gguf · llama.cpp"; "-" when none measured it."""
    best = best_generation_result(run)
    if best is None:
        return "-"
    measured = [r for r in run.results if r.speed is not None]
    label = cell_labels([r.cell for r in measured])[measured.index(best)]
    return f"{best.speed.generation_speed().mean:.1f} t/s {label}"  # type: ignore[union-attr]


class BenchPastRuns(DataTable[object]):
    class Chosen(Message):
        def __init__(self, run_id: int) -> None:
            super().__init__()
            self.run_id = run_id

    def __init__(self, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.add_columns("Run", "Date", "Models", "Cells", "Best tg")

    def show_runs(self, runs: list[BenchRun]) -> None:
        self.clear()
        for run in runs:
            models = ", ".join(run.request.models)
            failed = sum(1 for r in run.results if r.failed)
            cells = f"{len(run.results)}" + (f" ({failed} failed)" if failed else "")
            self.add_row(str(run.id), run_date(run), cell(models), cells, cell(best_generation(run)), key=str(run.id))

    @on(DataTable.RowSelected)
    def _chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.Chosen(int(event.row_key.value)))
