"""Pick a model from the local store to chat with."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
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
                *[Option(f"{m.name}  [dim]{m.format} · {m.quantization} · {m.size_bytes / 1e6:,.0f} MB[/dim]", id=m.name) for m in self._models]
            )

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
