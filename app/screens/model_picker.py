"""Pick a model from the local store to chat with, and the backend that runs it."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Select
from textual.widgets.option_list import Option

from pocketlm.models.store import LocalModel

AUTO = "auto"


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


class ModelPicker(ModalScreen[PickedModel | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, models: list[LocalModel], current_backend: str | None = None) -> None:
        super().__init__()
        self._models = {m.name: m for m in models}
        self._current_backend = current_backend

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Open a model")
            yield OptionList(*[Option(self._prompt(m), id=m.name) for m in self._models.values()], id="picker-models")
            yield Label("Backend")
            yield Select([("auto", AUTO)], value=AUTO, allow_blank=False, id="picker-backend")

    def on_mount(self) -> None:
        self._show_backends()

    @staticmethod
    def _prompt(model: LocalModel) -> Content:
        # $variables are inserted as written: a name or a file's quant type is never read as markup.
        facts = f"{model.format} · {model.quantization} · {model.size_bytes / 1e6:,.0f} MB"
        return Content.from_markup("$name  [dim]$facts[/dim]", name=model.name, facts=facts)

    def _highlighted(self) -> LocalModel | None:
        options = self.query_one("#picker-models", OptionList)
        if options.highlighted is None:
            return None
        return self._models.get(options.get_option_at_index(options.highlighted).id or "")

    @on(OptionList.OptionHighlighted, "#picker-models")
    def _show_backends(self) -> None:
        """The backends that can load the highlighted model, the default first and named as such."""
        model = self._highlighted()
        select = self.query_one("#picker-backend", Select)
        choices = backends_for(model.format) if model else []
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
        self.dismiss(PickedModel(event.option.id or "", backend))
