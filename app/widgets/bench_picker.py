"""What to bench: the stored models (adapters left out: a bench measures a model), the installed backends, llama-bench's
-p/-n/-r and an optional perplexity text. `request()` turns the choice into the BenchRequest the CLI would build."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, SelectionList

from pocketlm.models.errors import PocketError
from pocketlm.models.fit import human_bytes
from pocketlm.models.store import LocalModel

if TYPE_CHECKING:
    from pocketlm.app.bench_run import BenchRequest

# (input id, label, default, smallest allowed): llama-bench's flags and defaults (backends.speed.SpeedSettings).
_SETTINGS = (("bench-n-prompt", "-p prompt tokens", 512, 0), ("bench-n-gen", "-n generated", 128, 0), ("bench-repetitions", "-r repetitions", 5, 1))


def installed_backends() -> list[str]:
    """The backends that can run here, by name (loading their classes imports no engine)."""
    from pocketlm.backends.registry import backend_classes

    return [backend.name for backend in backend_classes() if backend.is_available()]


class BenchPicker(Horizontal):
    def compose(self) -> ComposeResult:
        with Vertical(id="bench-model-column"):
            yield Label("Models (space to choose)")
            yield SelectionList[str](id="bench-models")
        with Vertical(id="bench-options-column"):
            yield Label("Backends (none chosen: every one that loads the model)")
            yield SelectionList[str](id="bench-backends")
            with Horizontal(id="bench-settings"):
                for input_id, label, default, _ in _SETTINGS:
                    with Vertical():
                        yield Label(label)
                        yield Input(str(default), type="integer", id=input_id)
            yield Label("Threads (empty: the physical cores)")
            yield Input(placeholder="as --threads", type="integer", id="bench-threads")
            yield Label("Perplexity text (optional)")
            yield Input(placeholder="a text file: perplexity beside the speed", id="bench-ppl")

    def show_models(self, models: list[LocalModel]) -> None:
        """List `models` (adapters left out), keeping the ones already chosen."""
        chooser: SelectionList[str] = self.query_one("#bench-models", SelectionList)
        chosen = set(chooser.selected)
        chooser.clear_options()
        # Text, not str: a str prompt is markup, and model names are the user's.
        chooser.add_options([(Text(f"{m.name}  ({m.format} {m.quantization}, {human_bytes(m.size_bytes)})"), m.name, m.name in chosen)
                             for m in models if not m.is_adapter])  # fmt: skip

    def show_backends(self, names: list[str]) -> None:
        chooser: SelectionList[str] = self.query_one("#bench-backends", SelectionList)
        chosen = set(chooser.selected)
        chooser.clear_options()
        chooser.add_options([(Text(name), name, name in chosen) for name in names])

    def choose(self, models: list[str] | None = None, backends: list[str] | None = None) -> None:
        """Tick these models and backends (the others are left as they are)."""
        for chooser_id, values in (("#bench-models", models), ("#bench-backends", backends)):
            for value in values or ():
                self.query_one(chooser_id, SelectionList).select(value)

    def set_settings(self, n_prompt: int, n_gen: int, repetitions: int) -> None:
        for (input_id, *_), value in zip(_SETTINGS, (n_prompt, n_gen, repetitions)):
            self.query_one(f"#{input_id}", Input).value = str(value)

    def request(self) -> BenchRequest:
        """The bench the form describes; a PocketError saying what to fix when it describes none."""
        from pocketlm.app.bench_run import BenchRequest
        from pocketlm.backends.speed import SpeedSettings

        models = tuple(self.query_one("#bench-models", SelectionList).selected)
        if not models:
            raise PocketError("No model is chosen.", "Tick one or more models in the list (space or a click).")
        numbers = [self._number(input_id, label, smallest) for input_id, label, _, smallest in _SETTINGS]
        text = self.query_one("#bench-ppl", Input).value.strip() or None
        threads = self._number("bench-threads", "--threads threads", 1) if self.query_one("#bench-threads", Input).value.strip() else None
        return BenchRequest(models=models, backends=tuple(self.query_one("#bench-backends", SelectionList).selected),
                            settings=SpeedSettings(*numbers), threads=threads, perplexity_text=text)  # fmt: skip  # SpeedSettings refuses -p 0 -n 0

    def _number(self, input_id: str, label: str, smallest: int) -> int:
        value = self.query_one(f"#{input_id}", Input).value.strip()
        try:
            number = int(value)
        except ValueError:
            number = smallest - 1
        if number < smallest:
            raise PocketError(f"{label.split()[0]} takes a whole number of at least {smallest}, not {value or 'nothing'}.",
                              f"Set {label.split(' ', 1)[1]} to {smallest} or more.")  # fmt: skip
        return number
