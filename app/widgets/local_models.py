"""The local models: a sortable table beside the highlighted model's details and lineage.

LoRA adapters are listed under the model they were trained on (store.adapters_of decides which, by name, Hub repo or
path, up the lineage; adapter_loading.adapters_by_base the one they go under), an adapter's conversions under it; adapters whose base is not in the store come last, under a line naming
their base. Sorting orders the models, and each keeps its adapters below it. The remote endpoints (`pocketlm remote add`) come
last, a row each, read from the endpoints table without a network call; what one serves is asked in a worker when
its row is highlighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.content import Content
from textual.message import Message
from textual.widgets import DataTable, Static

from pocketlm.app.model_details import Alarming, adapter_rows, default_backend, detail_rows, device_of, known_device, origin, parameters
from pocketlm.app.verification import LEVEL_LOOKS
from pocketlm.app.widgets.cells import cell
from pocketlm.models.errors import PocketError
from pocketlm.models.fit import human_bytes
from pocketlm.models.remote_endpoints import REMOTE_FORMAT, RemoteEndpoint, RemoteEndpoints
from pocketlm.models.store import LocalModel, ModelStore
from pocketlm.models.verification_record import VerificationRecord

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp
    from pocketlm.backends.base import Backend
    from pocketlm.backends.remote import RemoteModelInfo

_COLUMNS = (("name", "Name"), ("format", "Format"), ("arch", "Arch"), ("params", "Params"), ("quant", "Quant"),
            ("size", "Size"), ("origin", "Origin"))  # fmt: skip
_NUMERIC = {"params": lambda m: m.parameter_count, "size": lambda m: m.size_bytes}
_FIELDS = {"name": lambda m: m.name, "format": lambda m: m.format, "arch": lambda m: m.architecture, "quant": lambda m: m.quantization,
           "origin": origin, **_NUMERIC}  # fmt: skip
_MISSING_BASE = "\0base:"  # the key of the line naming a base that is not in the store (no model has a NUL in its name)
_REMOTE = "\0remote:"  # the key of an endpoint's line: a stored model may have the same name as an endpoint


@dataclass(frozen=True)
class Row:
    """One line of the table: a model, an adapter under its base (depth 1) or its conversion (depth 2), or the line
    naming a base the store lacks (`model` None), or a remote endpoint (`endpoint`)."""

    key: str
    model: LocalModel | None
    depth: int = 0
    heading: str = ""
    endpoint: RemoteEndpoint | None = None


def endpoint_rows(endpoints: list[RemoteEndpoint]) -> list[Row]:
    """A line per remote endpoint, by name, after the stored models (sorting by a column of files means nothing for them)."""
    return [Row(f"{_REMOTE}{e.name}", None, endpoint=e) for e in sorted(endpoints, key=lambda e: e.name.lower())]


def table_rows(store: ModelStore, models: list[LocalModel], sort: tuple[str, bool]) -> list[Row]:
    """`models` (the store's list) in table order: the models sorted by `sort` (column, descending), each followed by
    its adapters (adapter_loading.adapters_by_base places each under one model), each adapter by its conversions."""
    from pocketlm.app.adapter_loading import adapters_by_base

    column, descending = sort
    field = _FIELDS[column]
    order = (lambda m: (field(m), m.name.lower())) if column in _NUMERIC else (lambda m: (str(field(m)).lower(), m.name.lower()))
    bases = sorted((m for m in models if not m.is_adapter), key=order, reverse=descending)  # type: ignore[arg-type]
    adapters = {m.name: m for m in models if m.is_adapter}
    conversions: dict[str, list[LocalModel]] = {}
    for adapter in adapters.values():
        if adapter.parent in adapters:
            conversions.setdefault(adapter.parent, []).append(adapter)
    placed: set[str] = set()

    def with_conversions(adapter: LocalModel) -> list[Row]:
        placed.add(adapter.name)
        children = sorted(conversions.get(adapter.name, []), key=lambda m: m.name.lower())
        placed.update(child.name for child in children)
        return [Row(adapter.name, adapter, 1), *(Row(child.name, child, 2) for child in children)]

    under = adapters_by_base(store, models)
    rows: list[Row] = []
    for base in bases:
        rows.append(Row(base.name, base))
        for adapter in under.get(base.name, []):
            rows += with_conversions(adapter)
    orphans: dict[str, list[LocalModel]] = {}
    for adapter in sorted(adapters.values(), key=lambda m: m.name.lower()):
        if adapter.name not in placed and adapter.parent not in adapters:
            orphans.setdefault(adapter.base_model or "an unknown base", []).append(adapter)
    for base_name in sorted(orphans, key=str.lower):
        rows.append(Row(f"{_MISSING_BASE}{base_name}", None, heading=f"{base_name} (not stored)"))
        for adapter in orphans[base_name]:
            rows += with_conversions(adapter)
    return rows


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
        # Each adapter's stored bases, worked out once per refresh: the details of the highlighted row need them at
        # every cursor move, and finding them means the whole list and each model's lineage.
        self._bases: dict[str, list[LocalModel]] = {}
        self._verdicts: dict[str, VerificationRecord] = {}  # each model's stored verification, read once per refresh
        self._endpoints: dict[str, RemoteEndpoint] = {}  # the endpoints table, read once per refresh
        # What each endpoint serves, or why it could not say: asked once per refresh, in a worker (a network call).
        self._served: dict[str, list[RemoteModelInfo] | PocketError] = {}
        self._listing: set[str] = set()  # endpoints a worker is asking now

    def compose(self) -> ComposeResult:
        yield DataTable(id="local-models", cursor_type="row", zebra_stripes=True)
        yield Static(id="local-details")

    def on_mount(self) -> None:
        table = self.query_one("#local-models", DataTable)
        for key, label in _COLUMNS:
            table.add_column(label, key=key)
        self.refresh_models()

    def refresh_models(self, select: str | None = None) -> None:
        """Fill the table from the store in the current order, the cursor kept on `select` or the row it was on."""
        table = self.query_one("#local-models", DataTable)
        current = select or self._cursor_key()
        from pocketlm.app.adapter_loading import bases_of_adapters

        table.clear()
        models = self.app.store.list()
        self._bases = bases_of_adapters(self.app.store, models)
        self._verdicts = self.app.store.verifications()
        endpoints = RemoteEndpoints(self.app.store.database)
        try:
            self._endpoints = {e.name: e for e in endpoints.list()}
        finally:
            endpoints.close()
        self._served.clear()
        for row in table_rows(self.app.store, models, self._sort) + endpoint_rows(list(self._endpoints.values())):
            name, *rest = map(cell, self._cells(row))
            if row.model is not None and (verdict := self._verdicts.get(row.model.name)) is not None:
                look = LEVEL_LOOKS[verdict.level]  # its verdict at a glance; the details say the figures and what to do
                name.append(look.flag, f"bold {look.colour}" if verdict.broken else look.colour or "")
            table.add_row(name, *rest, key=row.key)
        if current and current in table.rows:
            table.move_cursor(row=table.get_row_index(current))
        self._show_details()

    @staticmethod
    def _cells(row: Row) -> tuple[str, ...]:
        model = row.model
        if row.endpoint is not None:
            return (row.endpoint.name, REMOTE_FORMAT, "", "", "", "", row.endpoint.base_url)
        if model is None:
            return (row.heading, "", "", "", "", "", "")
        name = "  " * (row.depth - 1) + "└ " + model.name if row.depth else model.name
        return (name, model.format, model.architecture, parameters(model.parameter_count), model.quantization,
                human_bytes(model.size_bytes), origin(model))  # fmt: skip

    def _cursor_key(self) -> str | None:
        table = self.query_one("#local-models", DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def selected_name(self) -> str | None:
        """The highlighted model's or adapter's store name, or endpoint's name (what `chat` takes); None on the line
        naming a base the store lacks."""
        key = self._cursor_key()
        if key is None or key.startswith(_MISSING_BASE):
            return None
        return key.removeprefix(_REMOTE)

    def selected_endpoint(self) -> RemoteEndpoint | None:
        key = self._cursor_key()
        return self._endpoints.get(key.removeprefix(_REMOTE)) if key is not None and key.startswith(_REMOTE) else None

    def selected(self) -> LocalModel | None:
        """The highlighted stored model or adapter (None on an endpoint's line)."""
        key = self._cursor_key()
        if key is None or key.startswith((_MISSING_BASE, _REMOTE)):
            return None
        return self.app.store.get(key)

    def focus_table(self) -> None:
        self.query_one("#local-models", DataTable).focus()

    @on(DataTable.HeaderSelected, "#local-models")
    def _sort_by_column(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        column, descending = self._sort
        # A new column sorts names A→Z but numbers biggest first; the same column again reverses.
        self._sort = (key, not descending if key == column else key in _NUMERIC)
        self.refresh_models()  # rebuilt, not DataTable.sort: each model keeps its adapters below it

    @on(DataTable.RowHighlighted, "#local-models")
    def _show_details(self) -> None:
        if (endpoint := self.selected_endpoint()) is not None:
            self._show_endpoint(endpoint)
            return
        model = self.selected()
        details = self.query_one("#local-details", Static)
        if model is None:
            key = self._cursor_key()
            if key is not None and key.startswith(_MISSING_BASE):
                details.update(Content.from_markup("Adapters for [b]$base[/b], which is not in the store: pull or import it to use them.",
                                                   base=key.removeprefix(_MISSING_BASE)))  # fmt: skip
            else:
                details.update("No models yet.\n\nSearch the Hub (Ctrl+F) and pull one, or run `pocketlm import PATH`.")
            return
        if model.is_adapter:
            self._show_lines(model.name, adapter_rows(self.app.store, model, self._bases.get(model.name, []), use="Enter attaches it to the model open in Chat"))
            return
        chat_model = self.app.chat_screen.model
        loaded = self.app.chat_screen.loaded_facts() if chat_model is not None and chat_model.description.name == model.name else None
        rows = detail_rows(self.app.store, model, loaded, device=known_device)
        backend = default_backend(model)
        if not isinstance(backend, Exception) and known_device(backend) is None and backend.name not in self._asking:
            self._asking.add(backend.name)
            self._find_device(backend)  # the details are redrawn with it once known
        self._show_lines(model.name, rows)

    def _show_endpoint(self, endpoint: RemoteEndpoint) -> None:
        """The endpoint's address and key variable at once; what it serves when the worker has asked."""
        from pocketlm.app.model_details import remote_rows

        served = self._served.get(endpoint.name)
        if served is None and endpoint.name not in self._listing:
            self._listing.add(endpoint.name)
            self._list_served(endpoint)  # the details are redrawn with the answer
        rows = remote_rows(endpoint, None, served)
        rows.insert(-1, ("Enter", "opens it in Chat"))
        chat_model = self.app.chat_screen.model
        if chat_model is not None and chat_model.description.name == endpoint.name:
            rows.insert(-1, ("Open in Chat", chat_model.description.name + f", context {chat_model.description.context_length:,} tokens"))
        self._show_lines(endpoint.name, rows)

    @work(thread=True, group="remote-models", exit_on_error=False)
    def _list_served(self, endpoint: RemoteEndpoint) -> None:
        """GET /v1/models away from the UI thread: an unreachable server takes up to its connect timeout to say so."""
        from pocketlm.backends.remote import list_remote_models

        served: list[RemoteModelInfo] | PocketError
        try:
            served = list_remote_models(endpoint)
        except PocketError as error:
            served = error
        except Exception as error:  # noqa: BLE001 - the details say it; a dead worker would end the app
            from pocketlm.app.notify import unexpected

            served = unexpected(f"Asking {endpoint.name} for its models", error)
        self.app.call_from_thread(self._served_found, endpoint.name, served)

    def _served_found(self, name: str, served: list[RemoteModelInfo] | PocketError) -> None:
        self._listing.discard(name)
        self._served[name] = served
        if self.is_mounted:
            self._show_details()

    def _show_lines(self, name: str, rows: list[tuple[str, str]]) -> None:
        # Values go in as $variables: Textual inserts them as written, never as markup.
        lines = [Content.from_markup("[b]$name[/b]", name=name), Content("")]
        lines += [Content.from_markup("[dim]$label:[/dim] [bold red]$value[/]" if isinstance(value, Alarming) else "[dim]$label:[/dim] $value",
                                      label=label, value=value) for label, value in rows if label != "Name"]  # fmt: skip
        self.query_one("#local-details", Static).update(Content("\n").join(lines))

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
        key = str(event.row_key.value)
        if not key.startswith(_MISSING_BASE):
            self.post_message(self.OpenRequested(key.removeprefix(_REMOTE)))
