"""Pick a model from the local store to chat with."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from pocketlm.models.store import LocalModel


class ModelPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, models: list[LocalModel]) -> None:
        super().__init__()
        self._models = models

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Open a model")
            yield OptionList(
                *[Option(self._prompt(m), id=m.name) for m in self._models]
            )

    @staticmethod
    def _prompt(model: LocalModel) -> Content:
        # $variables are inserted as written: a name or a file's quant type is never read as markup.
        facts = f"{model.format} · {model.quantization} · {model.size_bytes / 1e6:,.0f} MB"
        return Content.from_markup("$name  [dim]$facts[/dim]", name=model.name, facts=facts)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
