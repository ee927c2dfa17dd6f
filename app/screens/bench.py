"""The Bench screen: choose models, backends and llama-bench's -p/-n/-r, run the bench in a worker with progress and
cancel, see the results as a table and charts, export them, and show past runs again. The measuring is app/bench_run's
(each cell in a child process, the run saved to the history); this screen lays it out."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, ProgressBar, TabbedContent, TabPane

from pocketlm.app.bench_report import system_line
from pocketlm.app.messages import JobFinished
from pocketlm.app.notify import as_pocket_error, notify_error
from pocketlm.app.screens.dialogs import TextPromptDialog
from pocketlm.app.widgets.bench_charts import BenchCharts
from pocketlm.app.widgets.bench_past_runs import BenchPastRuns
from pocketlm.app.widgets.bench_picker import BenchPicker, installed_backends
from pocketlm.app.widgets.bench_results import BenchResults
from pocketlm.app.worker_progress import new_job_id
from pocketlm.models.errors import Cancelled, PocketError

if TYPE_CHECKING:
    from pocketlm.app.bench_history import BenchHistory
    from pocketlm.app.bench_run import BenchEvent, BenchRequest, BenchRun
    from pocketlm.app.pocket_app import PocketApp


class BenchProgress(Message):
    """One event of the running bench (a cell started, progressed or finished), or first the run as begun (a BenchRun
    without results, for the table to fill as cells finish); `job` tells a stale one apart."""

    def __init__(self, job: int, event: BenchEvent | BenchRun) -> None:
        super().__init__()
        self.job = job
        self.event = event


class Exported(Message):
    """An export ended: written to `path`, or refused with `error`."""

    def __init__(self, path: Path, error: PocketError | None) -> None:
        super().__init__()
        self.path = path
        self.error = error


class BenchScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "back_or_cancel", "Back / Cancel"),
        Binding("ctrl+r", "run", "Run"),
        Binding("ctrl+x", "cancel", "Cancel"),
    ]

    app: PocketApp  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self._cancel: threading.Event | None = None
        self._job: int | None = None
        self._history: BenchHistory | None = None
        self._partial: BenchRun | None = None  # the running bench with the cells finished so far
        self.run: BenchRun | None = None  # the run shown in the table and charts (tests read it)
        self.last_export: Path | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="bench-tabs"):
            with TabPane("Setup", id="bench-setup"):
                yield BenchPicker(id="bench-picker")
                with Horizontal(classes="buttons"):
                    yield Button("Run", variant="primary", id="bench-start")
            with TabPane("Results", id="bench-results"):
                yield Label("No run yet: choose models on Setup and run, or pick one in Past runs.", id="bench-caption", markup=False)
                yield BenchResults(id="bench-table")
                yield BenchCharts(id="bench-charts")
                with Horizontal(classes="buttons"):
                    yield Button("Export chart (PNG/SVG)", id="bench-export-chart", disabled=True)
                    yield Button("Export table (Markdown)", id="bench-export-table", disabled=True)
            with TabPane("Past runs", id="bench-past"):
                yield BenchPastRuns(id="bench-runs")
        with Horizontal(id="bench-status"):
            yield Label("", id="bench-label", markup=False)  # names models and shows errors as written
            yield ProgressBar(id="bench-progress", show_eta=False)
            yield Button("Cancel", variant="warning", id="bench-cancel")
        yield Footer()

    @property
    def history(self) -> BenchHistory:
        if self._history is None:
            from pocketlm.app.bench_history import BenchHistory
            from pocketlm.models.locations import database_path

            self._history = BenchHistory(database_path())
        return self._history

    @property
    def picker(self) -> BenchPicker:
        return self.query_one(BenchPicker)

    @property
    def running(self) -> bool:
        return self._cancel is not None

    def on_mount(self) -> None:
        self.query_one("#bench-progress").display = False
        self.query_one("#bench-cancel").display = False
        self.picker.show_backends(installed_backends())
        self.show_run(None)

    def on_screen_resume(self) -> None:
        self.picker.show_models(self.app.store.list())
        self.refresh_past_runs()

    def on_unmount(self) -> None:
        self.stop()
        if self._history is not None:
            self._history.close()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.running
        if action == "run":
            return not self.running
        return True

    # Showing a run ----------------------------------------------------------------------------------------------

    def show_run(self, run: BenchRun | None) -> None:
        self.run = run
        self.query_one(BenchResults).show_run(run)
        self.query_one(BenchCharts).show_run(run)
        if run is not None:
            # Which run this is and where it ran (what a figure means depends on the machine), as the exports say it.
            self.query_one("#bench-caption", Label).update(system_line(run))
        self._enable_exports()

    def _enable_exports(self) -> None:
        can_export = self.run is not None and not self.running
        for button_id in ("#bench-export-chart", "#bench-export-table"):
            self.query_one(button_id, Button).disabled = not can_export

    def refresh_past_runs(self) -> None:
        self.query_one(BenchPastRuns).show_runs(self.history.runs())

    @on(BenchPastRuns.Chosen)
    def _past_run_chosen(self, message: BenchPastRuns.Chosen) -> None:
        self.show_saved_run(message.run_id)

    def show_saved_run(self, run_id: int) -> None:
        run = self.history.get(run_id)
        if run is None:  # deleted from the CLI meanwhile
            self.notify(f"Run {run_id} is no longer in the history.", severity="warning")
            self.refresh_past_runs()
            return
        self.show_run(run)
        self.query_one(TabbedContent).active = "bench-results"

    # Running ----------------------------------------------------------------------------------------------------

    @on(Button.Pressed, "#bench-start")
    def action_run(self) -> None:
        if self.running:
            return
        try:
            request = self.picker.request()
        except PocketError as error:
            notify_error(self, error, title="Cannot run the bench")
            return
        self._cancel, self._job, self._partial = threading.Event(), new_job_id(), None
        self.query_one("#bench-start", Button).disabled = True
        self.query_one("#bench-cancel").display = True
        self.query_one("#bench-progress").display = True
        self.query_one("#bench-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#bench-label", Label).update("Planning the bench…")
        self.query_one(TabbedContent).active = "bench-results"
        self._enable_exports()
        self.refresh_bindings()
        self.bench(request, self._cancel, self._job)

    @work(thread=True, group="bench")
    def bench(self, request: BenchRequest, cancel: threading.Event, job: int) -> None:
        from pocketlm.app.bench_history import BenchHistory
        from pocketlm.app.bench_run import BenchRun, RunFinished, run_bench
        from pocketlm.app.system_info import collect_system_info
        from pocketlm.models.locations import database_path

        # A connection of its own: the screen's reads the history on the event loop meanwhile.
        history = BenchHistory(database_path())
        try:
            self.post_message(BenchProgress(job, BenchRun(None, time.time(), collect_system_info(), request, ())))
            finished: RunFinished | None = None
            for event in run_bench(self.app.store, request, history, cancel):
                if isinstance(event, RunFinished):
                    finished = event
                else:
                    self.post_message(BenchProgress(job, event))
            run = finished.run if finished is not None and finished.run.id is not None else None  # id None: nothing finished
            cancelled = cancel.is_set() or (finished is not None and finished.cancelled)
            kept = "The cells that finished are in Past runs." if run is not None else "No cell had finished."
            self.post_message(JobFinished(job, run, Cancelled("The bench was cancelled.", kept) if cancelled else None))
        except Exception as error:  # noqa: BLE001 - a surprise in a worker becomes a notification, not a crash
            self.post_message(JobFinished(job, None, as_pocket_error("The bench", error)))
        finally:
            history.close()

    @on(BenchProgress)
    def _show_progress(self, message: BenchProgress) -> None:
        from pocketlm.app.bench_run import BenchRun, CellFinished, CellProgress, CellStarted, ModelsSkipped

        if message.job != self._job:  # a finished job's late message
            return
        if isinstance(message.event, BenchRun):
            self._partial = message.event
            return
        if isinstance(message.event, ModelsSkipped):
            self.notify(" ".join(message.event.reasons), title="Some models are left out", severity="warning", markup=False)
            return
        event, bar, label = message.event, self.query_one("#bench-progress", ProgressBar), self.query_one("#bench-label", Label)
        if isinstance(event, CellStarted):
            bar.update(total=event.total, progress=event.index - 1)  # index counts from 1
            label.update(f"{event.cell.model} on {event.cell.backend} ({event.index} of {event.total})")
        elif isinstance(event, CellProgress):
            fraction = event.done / event.total if event.total else 0.0
            done = len(self._partial.results) if self._partial is not None else 0
            bar.update(progress=done + fraction)
            label.update(f"{event.cell.model} on {event.cell.backend}: {event.stage}")
        elif isinstance(event, CellFinished) and self._partial is not None:
            bar.update(total=event.total, progress=event.index)
            # The cells so far, shown as they come; the saved run replaces this at the end.
            self._partial = replace(self._partial, results=(*self._partial.results, event.result))
            self.show_run(self._partial)

    @on(JobFinished)
    def _finished_job(self, message: JobFinished) -> None:
        from pocketlm.app.bench_run import BenchRun

        if message.job != self._job:
            return
        self._cancel = self._job = None
        self.query_one("#bench-progress").display = False
        self.query_one("#bench-cancel").display = False
        self.query_one("#bench-start", Button).disabled = False
        self.refresh_bindings()
        self.refresh_past_runs()
        run = message.result if isinstance(message.result, BenchRun) else None
        if run is not None:
            self.show_run(run)
        else:
            self._enable_exports()
        label = self.query_one("#bench-label", Label)
        if message.error is not None:
            label.update(str(message.error))
            notify_error(self, message.error, title="Bench cancelled" if isinstance(message.error, Cancelled) else "Bench failed")
            return
        if run is None:
            return
        failed = sum(1 for result in run.results if result.speed is None)
        text = f"Run {run.id} finished: {len(run.results) - failed} of {len(run.results)} measured."
        label.update(text)
        self.notify(text, severity="warning" if failed else "information", markup=False)

    @on(Button.Pressed, "#bench-cancel")
    def action_cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self.query_one("#bench-label", Label).update("Cancelling…")

    def stop(self) -> None:
        """Ask a running bench to stop (its child process is killed; safe at any time)."""
        if self._cancel is not None:
            self._cancel.set()

    def action_back_or_cancel(self) -> None:
        if self.running:
            self.action_cancel()
        else:
            self.app.pop_screen()

    # Exports ----------------------------------------------------------------------------------------------------

    def _default_export(self, suffix: str) -> Path:
        run_name = f"run-{self.run.id}" if self.run is not None and self.run.id is not None else "latest"
        return Path.cwd() / f"pocketlm-bench-{run_name}.{suffix}"

    @on(Button.Pressed, "#bench-export-chart")
    def ask_chart_path(self) -> None:
        self.app.push_screen(TextPromptDialog("Save the chart as (.png or .svg):", str(self._default_export("png"))),
                             lambda answer: self.export(Path(answer).expanduser(), "chart") if answer else None)  # fmt: skip

    @on(Button.Pressed, "#bench-export-table")
    def ask_table_path(self) -> None:
        self.app.push_screen(TextPromptDialog("Save the table as Markdown:", str(self._default_export("md"))),
                             lambda answer: self.export(Path(answer).expanduser(), "table") if answer else None)  # fmt: skip

    def export(self, destination: Path, what: str) -> None:
        """Write the shown run's chart ("chart": PNG or SVG by the suffix) or table ("table": Markdown) to `destination`."""
        if self.run is not None:
            self._export(self.run, destination, what)

    @work(thread=True, group="export")
    def _export(self, run: BenchRun, destination: Path, what: str) -> None:
        from pocketlm.app.chart_export import export_chart, export_table

        try:
            (export_chart if what == "chart" else export_table)(run, destination)
        except OSError as error:  # a missing folder, no permission
            reason = (error.strerror or str(error)).rstrip(".")
            self.post_message(Exported(destination, PocketError(f"Could not write {destination} ({reason}).", "Choose another file name.")))
        except Exception as error:  # noqa: BLE001 - a surprise in a worker becomes a notification, not a crash
            self.post_message(Exported(destination, as_pocket_error("The export", error)))
        else:
            self.post_message(Exported(destination, None))

    @on(Exported)
    def _exported(self, message: Exported) -> None:
        if message.error is not None:
            notify_error(self, message.error, title="Export failed")
            return
        self.last_export = message.path
        self.notify(f"Saved {message.path}.", markup=False)
