"""The local models: a sortable table beside the highlighted model's details and lineage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.content import Content
from textual.message import Message
from textual.widgets import DataTable, Static

from pocketlm.app.model_details import default_backend, detail_rows, device_of, known_device, origin, parameters
from pocketlm.app.widgets.cells import cell
from pocketlm.models.fit import human_bytes
from pocketlm.models.store import LocalModel

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp
    from pocketlm.backends.base import Backend

_COLUMNS = (("name", "Name"), ("format", "Format"), ("arch", "Arch"), ("params", "Params"), ("quant", "Quant"),
            ("size", "Size"), ("origin", "Origin"))  # fmt: skip
_NUMERIC = {"params": lambda m: m.parameter_count, "size": lambda m: m.size_bytes}


class LocalModels(Horizontal):
    class OpenRequested(Message):
        """The user chose a model (Enter or a click on its row) to chat with."""

        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    app: PocketApp  # type: ignore[assignment]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._sort: tuple[str, bool] = ("name", False)
        self._asking: set[str] = set()  # backends whose device a worker is finding

    def compose(self) -> ComposeResult:
        yield DataTable(id="local-models", cursor_type="row", zebra_stripes=True)
        yield Static(id="local-details")

    def on_mount(self) -> None:
        table = self.query_one("#local-models", DataTable)
        for key, label in _COLUMNS:
            table.add_column(label, key=key)
        self.refresh_models()

    def refresh_models(self, select: str | None = None) -> None:
        table = self.query_one("#local-models", DataTable)
        current = select or self.selected_name()
        table.clear()
        for model in self.app.store.list():
            cells = (model.name, model.format, model.architecture, parameters(model.parameter_count), model.quantization,
                     human_bytes(model.size_bytes), origin(model))  # fmt: skip
            table.add_row(*map(cell, cells), key=model.name)
        self._apply_sort()
        if current and current in table.rows:
            table.move_cursor(row=table.get_row_index(current))
        self._show_details()

    def selected_name(self) -> str | None:
        table = self.query_one("#local-models", DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def selected(self) -> LocalModel | None:
        name = self.selected_name()
        return self.app.store.get(name) if name else None

    def focus_table(self) -> None:
        self.query_one("#local-models", DataTable).focus()

    @on(DataTable.HeaderSelected, "#local-models")
    def _sort_by_column(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        column, descending = self._sort
        # A new column sorts names A→Z but numbers biggest first; the same column again reverses.
        self._sort = (key, not descending if key == column else key in _NUMERIC)
        self._apply_sort()

    def _apply_sort(self) -> None:
        table = self.query_one("#local-models", DataTable)
        column, descending = self._sort
        if column in _NUMERIC:
            models = {m.name: m for m in self.app.store.list()}
            measure = _NUMERIC[column]

            def sort_key(name: object) -> int:
                model = models.get(str(name))
                return measure(model) if model is not None else 0

            table.sort("name", key=sort_key, reverse=descending)
        else:
            table.sort(column, key=lambda value: str(value).lower(), reverse=descending)

    @on(DataTable.RowHighlighted, "#local-models")
    def _show_details(self) -> None:
        model = self.selected()
        details = self.query_one("#local-details", Static)
        if model is None:
            details.update("No models yet.\n\nSearch the Hub (Ctrl+F) and pull one, or run `pocketlm import PATH`.")
            return
        chat_model = self.app.chat_screen.model
        loaded = self.app.chat_screen.loaded_facts() if chat_model is not None and chat_model.description.name == model.name else None
        rows = detail_rows(self.app.store, model, loaded, device=known_device)
        backend = default_backend(model)
        if not isinstance(backend, Exception) and known_device(backend) is None and backend.name not in self._asking:
            self._asking.add(backend.name)
            self._find_device(backend)  # the details are redrawn with it once known
        # Values go in as $variables: Textual inserts them as written, never as markup.
        lines = [Content.from_markup("[b]$name[/b]", name=model.name), Content("")]
        lines += [Content.from_markup("[dim]$label:[/dim] $value", label=label, value=value) for label, value in rows if label != "Name"]
        details.update(Content("\n").join(lines))

    @work(thread=True, group="device", exit_on_error=False)
    def _find_device(self, backend: type[Backend]) -> None:
        """Ask `backend` where it runs (torch is imported for that: seconds), away from the UI thread."""
        device_of(backend)  # never raises: a backend that cannot say is ""
        self.app.call_from_thread(self._device_found, backend.name)

    def _device_found(self, name: str) -> None:
        self._asking.discard(name)
        if self.is_mounted:
            self._show_details()

    @on(DataTable.RowSelected, "#local-models")
    def _open(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(self.OpenRequested(str(event.row_key.value)))
