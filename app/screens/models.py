"""The Models screen: local models (sortable, with details and lineage), Hub search with quant choices, pull with
live progress and cancel, delete with confirmation, and open in Chat."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, OptionList, ProgressBar, Select, Static, TabbedContent, TabPane
from textual.widgets.option_list import Option

from pocketlm.app.model_details import detail_rows, origin, parameters
from pocketlm.app.screens.dialogs import ConfirmDialog
from pocketlm.models.errors import Cancelled, HubUnreachable, PocketError
from pocketlm.models.fit import human_bytes
from pocketlm.models.hub import SearchResult
from pocketlm.models.progress import ProgressUpdate
from pocketlm.models.store import LocalModel

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp

_LOCAL_COLUMNS = (("name", "Name"), ("format", "Format"), ("arch", "Arch"), ("params", "Params"), ("quant", "Quant"),
                  ("size", "Size"), ("origin", "Origin"))  # fmt: skip
_PROGRESS_INTERVAL_S = 0.1


def _cell(value: str) -> Text:
    """A table cell showing `value` as written: a str cell is parsed as markup, and a name like `evil[/]name` would raise
    MarkupError from the table's rendering and end the app. Laid out as DataTable lays out a one-line str cell."""
    return Text(value, no_wrap=True, end="")


class ModelsScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "back", "Chat"),
        Binding("enter", "open_in_chat", "Open in chat", show=False),
        Binding("f8,delete", "delete_model", "Delete"),
        Binding("ctrl+f", "focus_search", "Search Hub"),
        Binding("ctrl+x", "cancel_pull", "Cancel pull"),
        Binding("f4", "convert_selected", "Convert"),
    ]

    app: PocketApp  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self._results: dict[str, SearchResult] = {}
        self._pull_cancel: threading.Event | None = None
        self._sort: tuple[str, bool] = ("name", False)
        self._speed_samples: list[tuple[float, int]] = []
        self._latest_progress: ProgressUpdate | None = None
        self._progress_timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(id="models-tabs"):
            with TabPane("Local", id="local"):
                with Horizontal():
                    yield DataTable(id="local-models", cursor_type="row", zebra_stripes=True)
                    yield Static(id="local-details")
            with TabPane("Hugging Face Hub", id="hub"):
                with Horizontal(id="hub-search-bar"):
                    yield Input(placeholder="Search models on the Hub (Enter)", id="hub-query")
                    yield Select([(f, f) for f in ("gguf", "mlx", "gptq", "safetensors")], prompt="any format", id="hub-format")
                    yield Select([("downloads", "downloads"), ("likes", "likes"), ("updated", "updated")], value="downloads",
                                 allow_blank=False, id="hub-sort")  # fmt: skip
                # In place of the results while the Hub cannot be reached; the next search that gets an answer clears it.
                yield Static(id="hub-offline")
                with Horizontal(id="hub-browser"):
                    yield DataTable(id="hub-results", cursor_type="row", zebra_stripes=True)
                    with Vertical(id="hub-files-pane"):
                        yield Label("Files to pull", classes="title")
                        yield OptionList(id="hub-files")
        with Vertical(id="pull-panel"):
            yield Label("", id="pull-label", markup=False)  # shows specs, file names and errors as written
            with Horizontal(id="pull-row"):
                yield ProgressBar(id="pull-progress", show_eta=True)
                yield Label("", id="pull-speed")
                yield Button("Cancel", id="pull-cancel", variant="warning")
        yield Footer()

    def on_mount(self) -> None:
        local = self.query_one("#local-models", DataTable)
        for key, label in _LOCAL_COLUMNS:
            local.add_column(label, key=key)
        results = self.query_one("#hub-results", DataTable)
        for key, label in (("repo", "Model"), ("downloads", "Downloads"), ("likes", "Likes"), ("updated", "Updated"), ("formats", "Formats")):
            results.add_column(label, key=key)
        self.query_one("#pull-panel").display = False
        self.query_one("#hub-offline").display = False
        self.refresh_local()

    def on_screen_resume(self) -> None:
        self.refresh_local()

    @property
    def pulling(self) -> bool:
        return self._pull_cancel is not None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_pull":
            return self.pulling
        if action in ("delete_model", "open_in_chat"):
            return self.query_one(TabbedContent).active == "local"
        return True

    # Local models ----------------------------------------------------------------------------------------------

    def refresh_local(self, select: str | None = None) -> None:
        table = self.query_one("#local-models", DataTable)
        current = select or self.selected_local_name()
        table.clear()
        for model in self.app.store.list():
            cells = (model.name, model.format, model.architecture, parameters(model.parameter_count), model.quantization,
                     human_bytes(model.size_bytes), origin(model))  # fmt: skip
            table.add_row(*map(_cell, cells), key=model.name)
        self._apply_sort()
        if current and current in table.rows:
            table.move_cursor(row=table.get_row_index(current))
        self._show_details()

    def selected_local_name(self) -> str | None:
        table = self.query_one("#local-models", DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def _selected_local(self) -> LocalModel | None:
        name = self.selected_local_name()
        return self.app.store.get(name) if name else None

    @on(DataTable.HeaderSelected, "#local-models")
    def sort_by_column(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        column, descending = self._sort
        self._sort = (key, not descending if key == column else key in ("params", "size"))
        self._apply_sort()

    def _apply_sort(self) -> None:
        table = self.query_one("#local-models", DataTable)
        column, descending = self._sort
        models = {m.name: m for m in self.app.store.list()}
        numeric = {"params": lambda m: m.parameter_count, "size": lambda m: m.size_bytes}

        def sort_key(name: object) -> object:
            model = models.get(str(name))
            if model is None:
                return 0
            return numeric[column](model) if column in numeric else str(name).lower()

        if column in numeric:
            table.sort("name", key=sort_key, reverse=descending)
        else:
            table.sort(column, key=lambda value: str(value).lower(), reverse=descending)

    @on(DataTable.RowHighlighted, "#local-models")
    def _show_details(self) -> None:
        model = self._selected_local()
        details = self.query_one("#local-details", Static)
        if model is None:
            details.update("No models yet.\n\nSearch the Hub (Ctrl+F) and pull one, or run `pocketlm import PATH`.")
            return
        rows = detail_rows(self.app.store, model)
        # Values go in as $variables: Textual inserts them as written, never as markup.
        lines = [Content.from_markup("[b]$name[/b]", name=model.name), Content("")]
        lines += [Content.from_markup("[dim]$label:[/dim] $value", label=label, value=value) for label, value in rows if label != "Name"]
        details.update(Content("\n").join(lines))

    @on(DataTable.RowSelected, "#local-models")
    def action_open_in_chat(self) -> None:
        if name := self.selected_local_name():
            self.app.pop_screen()
            self.app.chat_screen.begin_loading(name)

    def action_delete_model(self) -> None:
        from pocketlm.models.removal import plan_removal, remove_model

        model = self._selected_local()
        if model is None:
            return
        if self.app.chat_screen.model is not None and self.app.chat_screen.model.description.name == model.name:
            self.notify(f"{model.name} is open in Chat; open another model first.", severity="warning", markup=False)
            return
        removal = plan_removal(self.app.store, model)
        question = removal.summary(model.name)

        def confirmed(yes: bool | None) -> None:
            if yes:
                remove_model(self.app.store, model)
                self.notify(f"Deleted {model.name}.", markup=False)
                self.refresh_local()

        self.app.push_screen(ConfirmDialog(question, "Delete"), confirmed)

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_convert_selected(self) -> None:
        """Open the Convert screen with the highlighted local model chosen."""
        name = self.selected_local_name() if self.query_one(TabbedContent).active == "local" else None
        self.app.pop_screen()
        self.app.push_screen("convert")
        if name:
            self.app.convert_screen.choose_source(name)

    # Hub search ------------------------------------------------------------------------------------------------

    def action_focus_search(self) -> None:
        self.query_one(TabbedContent).active = "hub"
        self.query_one("#hub-query", Input).focus()

    @on(Input.Submitted, "#hub-query")
    def submit_search(self) -> None:
        query = self.query_one("#hub-query", Input).value.strip()
        model_format = self.query_one("#hub-format", Select).value
        sort = self.query_one("#hub-sort", Select).value
        self.query_one("#hub-results", DataTable).loading = True
        self.search(query, model_format if isinstance(model_format, str) else None, str(sort))

    @work(thread=True, exclusive=True, group="search")
    def search(self, query: str, model_format: str | None, sort: str) -> None:
        from pocketlm.models.hub import search_models

        try:
            results = search_models(query, model_format, sort, limit=30)  # type: ignore[arg-type]
        except HubUnreachable as error:
            if not get_current_worker().is_cancelled:
                self.app.call_from_thread(self._show_unreachable, error)
            return
        except PocketError as error:
            if not get_current_worker().is_cancelled:
                self.app.call_from_thread(self._search_failed, str(error))
            return
        except Exception as error:  # noqa: BLE001
            if not get_current_worker().is_cancelled:
                self.app.call_from_thread(self._search_failed, f"The search failed unexpectedly: {error}")
            return
        if not get_current_worker().is_cancelled:  # a newer search replaced this one
            self.app.call_from_thread(self._show_results, results)

    def _search_failed(self, message: str) -> None:
        self.query_one("#hub-results", DataTable).loading = False
        self.notify(message, title="Search failed", severity="error", timeout=15, markup=False)

    def _show_unreachable(self, error: HubUnreachable) -> None:
        """A state of the tab, not a toast that vanishes: nothing else on it works until the Hub answers."""
        self.query_one("#hub-results", DataTable).loading = False
        self._set_hub_reachable(False)
        self.query_one("#hub-offline", Static).update(
            Content.from_markup(
                "[b]Can't reach the Hugging Face Hub.[/b]\n\n$message\n\n"
                "Local models still work (the Local tab). Check your connection, then retry with Ctrl+F and Enter.",
                message=error.message,
            )
        )

    def _set_hub_reachable(self, reachable: bool) -> None:
        self.query_one("#hub-offline").display = not reachable
        self.query_one("#hub-browser").display = reachable

    @property
    def hub_unreachable(self) -> bool:
        return bool(self.query_one("#hub-offline").display)

    def _show_results(self, results: list[SearchResult]) -> None:
        self._set_hub_reachable(True)
        table = self.query_one("#hub-results", DataTable)
        table.loading = False
        table.clear()
        self._results = {r.repo_id: r for r in results}
        for r in results:
            updated = r.last_modified.strftime("%Y-%m-%d") if r.last_modified else "?"
            cells = (r.repo_id + (" (gated)" if r.gated else ""), f"{r.downloads:,}", f"{r.likes:,}", updated, ", ".join(r.formats))
            table.add_row(*map(_cell, cells), key=r.repo_id)
        if not results:
            self.notify("No models on the Hub match that search.")
        self._show_files()
        if results:
            table.focus()

    @on(DataTable.RowHighlighted, "#hub-results")
    def _show_files(self) -> None:
        options = self.query_one("#hub-files", OptionList)
        options.clear_options()
        table = self.query_one("#hub-results", DataTable)
        if not table.row_count:
            return
        result = self._results.get(str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value))
        if result is None:
            return
        from pocketlm.models.gguf_quants import default_choice

        if result.gguf_files:
            default = default_choice(list(result.gguf_files))
            for choice in result.gguf_files:
                parts = f", {len(choice.files)} parts" if len(choice.files) > 1 else ""
                note = "  [dim](default)[/dim]" if choice == default else ""
                # The quant name comes from the repo's file names: a $variable, shown as written.
                prompt = Content.from_markup(f"$label{note}", label=f"{choice.quant}  {human_bytes(choice.size_bytes)}{parts}")
                # By file, not quant name: a repo may hold two files of one quant.
                options.add_option(Option(prompt, id=f"{result.repo_id}:{choice.first_file}"))
        if set(result.formats) & {"safetensors", "mlx", "gptq", "lora"} or not result.gguf_files:
            options.add_option(Option("Checkpoint: config, tokenizer and safetensors weights", id=result.repo_id))

    @on(DataTable.RowSelected, "#hub-results")
    def _focus_files(self) -> None:
        self.query_one("#hub-files", OptionList).focus()

    @on(OptionList.OptionSelected, "#hub-files")
    def _pull_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.start_pull(event.option.id)

    # Pull ------------------------------------------------------------------------------------------------------

    def start_pull(self, spec: str) -> None:
        if self.pulling:
            self.notify("One pull at a time: wait for this one, or cancel it (Ctrl+X).", severity="warning")
            return
        self._pull_cancel = threading.Event()
        self._speed_samples = []
        self.query_one("#pull-panel").display = True
        self.query_one("#pull-label", Label).update(f"Looking up {spec}…")
        self.query_one("#pull-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#pull-speed", Label).update("")
        self.refresh_bindings()
        self._latest_progress = None
        self._progress_timer = self.set_interval(_PROGRESS_INTERVAL_S, self._show_progress)
        self.pull(spec, self._pull_cancel)

    @work(thread=True, group="pull")
    def pull(self, spec: str, cancel: threading.Event) -> None:
        from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull

        def progress(update: ProgressUpdate) -> None:
            self._latest_progress = update  # the UI's timer shows the newest; a chunk never waits for the UI

        try:
            plan = plan_pull(parse_pull_spec(spec))
            model = run_pull(plan, self.app.store, progress, cancel)
        except Cancelled as error:
            self.app.call_from_thread(self._pull_finished, None, str(error) + " Pull it again to resume.", "warning")
        except PocketError as error:
            self.app.call_from_thread(self._pull_finished, None, str(error), "error")
        except Exception as error:  # noqa: BLE001 - a worker's surprise must become a notification, not end the app
            self.app.call_from_thread(self._pull_finished, None, f"The pull failed unexpectedly: {error}", "error")
        else:
            self.app.call_from_thread(self._pull_finished, model, f"{model.name} is ready: press Enter to chat with it.", "information")

    def _show_progress(self) -> None:
        update = self._latest_progress
        if update is None:
            return
        self.query_one("#pull-label", Label).update(update.description)
        self.query_one("#pull-progress", ProgressBar).update(total=update.total, progress=update.completed)
        now = time.monotonic()
        self._speed_samples = [(t, n) for t, n in self._speed_samples if now - t < 3] + [(now, update.completed)]
        (start, first), (_, last) = self._speed_samples[0], self._speed_samples[-1]
        if now - start > 0.2:
            self.query_one("#pull-speed", Label).update(f"{human_bytes(int((last - first) / (now - start)))}/s")

    def _pull_finished(self, model: LocalModel | None, message: str, severity: str) -> None:
        self._pull_cancel = None
        if self._progress_timer is not None:
            self._progress_timer.stop()
        self.query_one("#pull-panel").display = False
        self.refresh_bindings()
        self.notify(message, severity=severity, timeout=10 if severity == "information" else 15, markup=False)  # type: ignore[arg-type]
        if model is not None:
            self.query_one(TabbedContent).active = "local"
            self.refresh_local(select=model.name)
            self.query_one("#local-models", DataTable).focus()

    def stop_pull(self) -> None:
        """Ask a running pull to stop (safe at any time, also while the app shuts down)."""
        if self._pull_cancel is not None:
            self._pull_cancel.set()

    @on(Button.Pressed, "#pull-cancel")
    def action_cancel_pull(self) -> None:
        if self._pull_cancel is not None:
            self._pull_cancel.set()
            self.query_one("#pull-label", Label).update("Cancelling…")
