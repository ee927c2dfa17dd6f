"""Pick a model to chat with, a stored one or a remote endpoint's, and the backend that runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Select
from textual.widgets.option_list import Option

from pocketlm.models.errors import PocketError
from pocketlm.models.remote_endpoints import REMOTE_FORMAT, RemoteEndpoint, RemoteEndpoints
from pocketlm.models.store import LocalModel

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp
    from pocketlm.backends.remote import RemoteModelInfo

AUTO = "auto"
_REMOTE = "\0remote:"  # an endpoint's option id: a stored model may have the same name as an endpoint


@dataclass(frozen=True)
class PickedModel:
    name: str
    backend: str | None  # None: the backend with the best priority for the model's format


@dataclass(frozen=True)
class BackendChoice:
    name: str
    available: bool
    install_hint: str


def backends_for(model_format: str) -> list[BackendChoice]:
    """The registered backends that load `model_format`, the default (lowest priority) first; an uninstalled one is
    listed too, so the user learns what to install."""
    from pocketlm.backends.registry import loaders_for

    return [BackendChoice(b.name, b.is_available(), b.install_hint) for b in loaders_for(model_format)]


def configured_endpoints(database: Path) -> list[RemoteEndpoint]:
    """The endpoints table (no network call): what the picker lists beside the stored models."""
    endpoints = RemoteEndpoints(database)
    try:
        return endpoints.list()
    finally:
        endpoints.close()


class ModelPicker(ModalScreen[PickedModel | None]):
    """Stored models, then each remote endpoint. An endpoint's line is there at once; what it serves is asked in a
    worker: one model is named on its line, several get a line each (`NAME/MODEL`), since a bare NAME cannot say which."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    app: PocketApp  # type: ignore[assignment]

    def __init__(self, models: list[LocalModel], current_backend: str | None = None, endpoints: list[RemoteEndpoint] | None = None) -> None:
        super().__init__()
        self._models = {m.name: m for m in models}
        self._current_backend = current_backend
        self._endpoint_list = endpoints  # None: the app store's endpoints table
        self._remote: dict[str, str] = {}  # option id -> the name `chat` takes (NAME or NAME/MODEL)

    def compose(self) -> ComposeResult:
        endpoints = self._endpoint_list if self._endpoint_list is not None else configured_endpoints(self.app.store.database)
        self._endpoint_list = endpoints
        options = [Option(self._prompt(m), id=m.name) for m in self._models.values()]
        for endpoint in endpoints:
            self._remote[_REMOTE + endpoint.name] = endpoint.name
            options.append(Option(self._remote_prompt(endpoint.name, endpoint.base_url), id=_REMOTE + endpoint.name))
        with Vertical(classes="dialog"):
            yield Label("Open a model")
            yield OptionList(*options, id="picker-models")
            yield Label("Backend")
            yield Select([("auto", AUTO)], value=AUTO, allow_blank=False, id="picker-backend")

    def on_mount(self) -> None:
        self._show_backends()
        for endpoint in self._endpoint_list or []:
            self._list_served(endpoint)

    @staticmethod
    def _prompt(model: LocalModel) -> Content:
        # $variables are inserted as written: a name or a file's quant type is never read as markup.
        facts = f"{model.format} · {model.quantization} · {model.size_bytes / 1e6:,.0f} MB"
        return Content.from_markup("$name  [dim]$facts[/dim]", name=model.name, facts=facts)

    @staticmethod
    def _remote_prompt(name: str, facts: str) -> Content:
        return Content.from_markup("$name  [dim]remote · $facts[/dim]", name=name, facts=facts)

    @work(thread=True, group="remote-models", exit_on_error=False)
    def _list_served(self, endpoint: RemoteEndpoint) -> None:
        from pocketlm.backends.remote import list_remote_models

        try:
            served: list[RemoteModelInfo] | PocketError = list_remote_models(endpoint)
        except PocketError as error:
            served = error
        if self.is_attached:  # the user may have picked, or left, while the server was answering
            self.app.call_from_thread(self._served_found, endpoint, served)

    def _served_found(self, endpoint: RemoteEndpoint, served: list[RemoteModelInfo] | PocketError) -> None:
        if not self.is_attached:
            return
        options = self.query_one("#picker-models", OptionList)
        if isinstance(served, PocketError):  # choosing it still tries, and the load's notification says why
            options.replace_option_prompt(_REMOTE + endpoint.name, self._remote_prompt(endpoint.name, f"{endpoint.base_url} · not answering"))
        elif len(served) == 1:
            options.replace_option_prompt(_REMOTE + endpoint.name, self._remote_prompt(endpoint.name, f"{endpoint.base_url} · {served[0].id}"))
        else:
            for model in served:
                name = f"{endpoint.name}/{model.id}"
                self._remote[_REMOTE + name] = name
                options.add_option(Option(self._remote_prompt(name, endpoint.base_url), id=_REMOTE + name))

    def _highlighted_format(self) -> str | None:
        options = self.query_one("#picker-models", OptionList)
        if options.highlighted is None:
            return None
        option_id = options.get_option_at_index(options.highlighted).id or ""
        if option_id in self._remote:
            return REMOTE_FORMAT
        model = self._models.get(option_id)
        return model.format if model else None

    @on(OptionList.OptionHighlighted, "#picker-models")
    def _show_backends(self) -> None:
        """The backends that can load the highlighted model, the default first and named as such."""
        model_format = self._highlighted_format()
        select = self.query_one("#picker-backend", Select)
        choices = backends_for(model_format) if model_format else []
        installed = [c for c in choices if c.available]
        options: list[tuple[str, str]] = []
        if installed:
            # Its value names the backend: a Select redraws its label only when its value changes.
            options.append((f"auto ({installed[0].name})", f"{AUTO}:{installed[0].name}"))
        options += [(c.name if c.available else f"{c.name} (not installed)", c.name) for c in choices]
        if not options:
            options = [("none installed for this format", f"{AUTO}:none")]
        previous = select.value
        select.set_options(options)
        values = [value for _, value in options]
        select.value = previous if previous in values and previous != Select.NULL else (
            self._current_backend if self._current_backend in values else values[0])  # fmt: skip

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        value = self.query_one("#picker-backend", Select).value
        backend = None if not isinstance(value, str) or value.startswith(AUTO) else value
        option_id = event.option.id or ""
        self.dismiss(PickedModel(self._remote.get(option_id, option_id), backend))
