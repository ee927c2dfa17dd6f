"""The conversation's system prompt and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass, replace

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, TextArea

from pocketlm.backends.base import SamplingParams


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str
    sampling: SamplingParams


_FIELDS = (  # (input id, label, SamplingParams field, type, lowest, highest)
    ("temperature", "Temperature (0 = greedy)", "temperature", float, 0.0, 10.0),
    ("top-p", "Top-p", "top_p", float, 0.0, 1.0),
    ("top-k", "Top-k", "top_k", int, 0, 1_000_000),
    ("max-tokens", "Max tokens (empty = no limit)", "max_tokens", int, 1, 2**31 - 1),
    ("seed", "Seed (empty = random)", "seed", int, 0, 2**32 - 2),
)


class ChatSettingsDialog(ModalScreen[ChatSettings | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, settings: ChatSettings) -> None:
        super().__init__()
        self._settings = settings

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog settings"):
            yield Label("System prompt")
            yield TextArea(self._settings.system_prompt, id="system-prompt")
            with Grid(id="sampling-grid"):
                for input_id, label, field, *_ in _FIELDS:
                    value = getattr(self._settings.sampling, field)
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=input_id, compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "save":
            self.dismiss(None)
            return
        changes: dict[str, object] = {}
        for input_id, label, field, kind, lowest, highest in _FIELDS:
            text = self.query_one(f"#{input_id}", Input).value.strip()
            if not text and field in ("max_tokens", "seed"):
                changes[field] = None
                continue
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or not lowest <= value <= highest:  # NaN fails this too
                self.notify(f"{label} must be a number from {lowest} to {highest}.", severity="error")
                return
            changes[field] = value
        system_prompt = self.query_one("#system-prompt", TextArea).text.strip()
        self.dismiss(ChatSettings(system_prompt, replace(self._settings.sampling, **changes)))  # type: ignore[arg-type]
