"""Pick a stored LoRA adapter to attach to the open model."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from pocketlm.models.store import LocalModel


class AdapterPicker(ModalScreen[str | None]):
    """Dismissed with the chosen adapter's store name, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, adapters: list[LocalModel], base_name: str) -> None:
        super().__init__()
        self._adapters = adapters
        self._base_name = base_name

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Content.from_markup("Attach an adapter to $base", base=self._base_name))
            yield OptionList(*[Option(self._prompt(a), id=a.name) for a in self._adapters], id="picker-adapters")

    @staticmethod
    def _prompt(adapter: LocalModel) -> Content:
        # $variables are inserted as written: names are the user's, never markup.
        base = adapter.base_model or "base unknown"
        return Content.from_markup("$name  [dim]$format · for $base[/dim]", name=adapter.name, format=adapter.format, base=base)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
