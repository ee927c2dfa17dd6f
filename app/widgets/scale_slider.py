"""A one-line slider for an adapter's scale: a bar, a knob and the value (Textual has no slider of its own).

Left/right (or -/+) move it by one step, Home/End to the ends; a click on the bar puts the knob there. Its range is
0..2 and widens to take the value it starts at (`--adapter x:3` shows 3.00 on a 0..3 bar), so a scale is never shown
as, or silently changed to, another one.
"""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

_VALUE_WIDTH = 5  # " 1.25"


class ScaleSlider(Widget, can_focus=True):
    BINDINGS = [
        Binding("left,minus", "step(-1)", "Less", show=False),
        Binding("right,plus,equals_sign", "step(1)", "More", show=False),
        Binding("home", "to(0)", show=False),  # fractions of the range
        Binding("end", "to(1)", show=False),
    ]

    value: reactive[float] = reactive(1.0)

    class Changed(Message):
        """The user moved the slider (never posted when the program sets the value)."""

        def __init__(self, slider: ScaleSlider, value: float) -> None:
            super().__init__()
            self.slider = slider
            self.value = value

        @property
        def control(self) -> ScaleSlider:
            return self.slider

    def __init__(self, value: float = 1.0, *, maximum: float = 2.0, step: float = 0.05, id: str | None = None,
                 classes: str | None = None) -> None:  # fmt: skip
        super().__init__(id=id, classes=classes)
        self.minimum = min(0.0, value)
        self.maximum = max(maximum, value)
        self.step = step
        self.set_reactive(ScaleSlider.value, value)  # as given: only a move by the user rounds it to the steps

    def _clamped(self, value: float) -> float:
        # Rounded to the step: 0.1 + 0.05 must read back as 0.15, not 0.15000000000000002, in the status line and history.
        steps = round(min(max(value, self.minimum), self.maximum) / self.step)
        return min(max(round(steps * self.step, 6), self.minimum), self.maximum)

    def _move_to(self, value: float) -> None:
        value = self._clamped(value)
        if value != self.value:
            self.value = value
            self.post_message(self.Changed(self, value))

    def action_step(self, direction: int) -> None:
        self._move_to(self.value + direction * self.step)

    def action_to(self, fraction: float) -> None:
        self._move_to(self.minimum + fraction * (self.maximum - self.minimum))

    @property
    def _bar_width(self) -> int:
        return max(self.size.width - _VALUE_WIDTH, 2)

    def on_click(self, event: events.Click) -> None:
        if event.x < self._bar_width:
            self.action_to(event.x / (self._bar_width - 1))

    def render(self) -> str:
        width = self._bar_width
        knob = round((self.value - self.minimum) / (self.maximum - self.minimum) * (width - 1))
        return "━" * knob + "●" + "─" * (width - 1 - knob) + f"{self.value:>{_VALUE_WIDTH}.2f}"
