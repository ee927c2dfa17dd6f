"""The Convert screen: pick a model, a GGUF output type and a quantization (with the expected size and a note on
quality), run it with progress and cancel, then open the result in Chat."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Label, OptionList, ProgressBar, Select
from textual.widgets.option_list import Option

from pocketlm.converters.conversion_job import OUTTYPE_BYTES_PER_WEIGHT, outtype_for
from pocketlm.converters.quant_types import QUANT_TYPES, UNQUANTIZED_TYPES, expected_size
from pocketlm.models.errors import Cancelled, PocketError
from pocketlm.models.fit import human_bytes
from pocketlm.models.progress import ProgressUpdate
from pocketlm.models.store import LocalModel

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp

_NO_QUANT = "none"


def convertible(model: LocalModel) -> bool:
    return model.format == "safetensors" or (model.format == "gguf" and model.quantization in UNQUANTIZED_TYPES)


class ConvertScreen(Screen[None]):
    BINDINGS = [Binding("escape", "back", "Back"), Binding("ctrl+x", "cancel", "Cancel")]

    app: PocketApp  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self._cancel: threading.Event | None = None
        self._latest: ProgressUpdate | None = None
        self._timer: Timer | None = None
        self.result: LocalModel | None = None
        self._select_on_mount: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="convert-form"):
            yield Label("Model (a safetensors checkpoint, or an f16/bf16/f32 GGUF to quantize)")
            yield Select([], prompt="choose a model", id="convert-source")
            yield Label("GGUF written from the checkpoint")
            yield Select([("auto (bf16 for bf16 weights, else f16)", "auto")] + [(t, t) for t in ("f16", "bf16", "f32", "q8_0")],
                         value="auto", allow_blank=False, id="convert-outtype")  # fmt: skip
            yield Label("Quantization")
            yield OptionList(id="convert-quant")
            with Horizontal(classes="buttons"):
                yield Button("Convert", variant="primary", id="convert-start")
                yield Button("Open in chat", id="convert-open", disabled=True)
            yield Label("", id="convert-label", markup=False)  # shows model names and errors as written
            yield ProgressBar(id="convert-progress", show_eta=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#convert-progress").display = False
        self.refresh_sources(select=self._select_on_mount)

    def choose_source(self, name: str) -> None:
        """Choose `name` as the model to convert; on a screen pushed for the first time, once its widgets exist."""
        if self.is_mounted:
            self.refresh_sources(select=name)
        else:
            self._select_on_mount = name

    def on_screen_resume(self) -> None:
        self.refresh_sources()

    @property
    def running(self) -> bool:
        return self._cancel is not None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.running if action == "cancel" else True

    def refresh_sources(self, select: str | None = None) -> None:
        source = self.query_one("#convert-source", Select)
        current = select or (source.value if isinstance(source.value, str) else None)
        models = [m for m in self.app.store.list() if convertible(m)]
        # Text, not str: a str prompt is parsed as markup, and model names are the user's.
        source.set_options([(Text(f"{m.name}  ({m.format} {m.quantization})"), m.name) for m in models])
        if current in {m.name for m in models}:
            source.value = current
        self._show_quants()

    def source_model(self) -> LocalModel | None:
        value = self.query_one("#convert-source", Select).value
        return self.app.store.get(value) if isinstance(value, str) else None

    @on(Select.Changed)
    def _show_quants(self) -> None:
        model = self.source_model()
        outtype = str(self.query_one("#convert-outtype", Select).value)
        self.query_one("#convert-outtype", Select).disabled = model is not None and model.format == "gguf"
        quants = self.query_one("#convert-quant", OptionList)
        highlighted = quants.highlighted
        quants.clear_options()
        parameters = model.parameter_count if model else 0
        if model is None or model.format == "safetensors":
            kept = outtype_for(model, outtype)
            size = f"≈ {human_bytes(int(parameters * OUTTYPE_BYTES_PER_WEIGHT[kept]))}" if parameters else ""
            quants.add_option(Option(f"none: keep {kept}  [dim]{size}[/dim]", id=_NO_QUANT))
        for quant in QUANT_TYPES.values():
            size = f"≈ {human_bytes(expected_size(parameters, quant))} · " if parameters else ""
            quants.add_option(Option(f"{quant.name:<7} [dim]{size}{quant.quality}[/dim]", id=quant.name))
        quants.highlighted = highlighted if highlighted is not None and highlighted < quants.option_count else self._default_index(quants)

    @staticmethod
    def _default_index(quants: OptionList) -> int:
        for index in range(quants.option_count):
            if quants.get_option_at_index(index).id == "Q4_K_M":
                return index
        return 0

    @on(Button.Pressed, "#convert-start")
    @on(OptionList.OptionSelected, "#convert-quant")
    def start(self) -> None:
        from pocketlm.converters.base import ConvertOptions

        if self.running:
            return
        model = self.source_model()
        quants = self.query_one("#convert-quant", OptionList)
        if model is None or quants.highlighted is None:
            self.notify("Choose a model and a quantization first.", severity="warning")
            return
        quant = quants.get_option_at_index(quants.highlighted).id
        self._cancel = threading.Event()
        options = ConvertOptions(outtype=str(self.query_one("#convert-outtype", Select).value),
                                 quant=None if quant == _NO_QUANT else quant, cancel=self._cancel)  # fmt: skip
        self.query_one("#convert-start", Button).disabled = True
        self.query_one("#convert-open", Button).disabled = True
        self.query_one("#convert-progress").display = True
        self.query_one("#convert-progress", ProgressBar).update(total=None, progress=0)
        self._latest = None
        self._timer = self.set_interval(0.1, self._show_progress)
        self.refresh_bindings()
        self.convert(model, options)

    @work(thread=True, group="convert")
    def convert(self, model: LocalModel, options: object) -> None:
        from pocketlm.converters.conversion_job import convert_model

        def progress(update: ProgressUpdate) -> None:
            self._latest = update

        try:
            result = convert_model(self.app.store, model, options, progress)  # type: ignore[arg-type]
        except Cancelled as error:
            self.app.call_from_thread(self._finished, None, str(error), "warning")
        except PocketError as error:
            self.app.call_from_thread(self._finished, None, str(error), "error")
        except Exception as error:  # noqa: BLE001 - a surprise in a worker becomes a notification, not a crash
            message = f"The conversion failed unexpectedly: {type(error).__name__}: {str(error).rstrip('.')}. This is a bug in pocketlm; please report it."
            self.app.call_from_thread(self._finished, None, message, "error")
        else:
            self.app.call_from_thread(self._finished, result, f"{result.name} is ready ({human_bytes(result.size_bytes)}).", "information")

    def _show_progress(self) -> None:
        if (update := self._latest) is not None:
            self.query_one("#convert-label", Label).update(update.description)
            self.query_one("#convert-progress", ProgressBar).update(total=update.total, progress=update.completed)

    def _finished(self, result: LocalModel | None, message: str, severity: str) -> None:
        self._cancel = None
        if self._timer is not None:
            self._timer.stop()
        self.query_one("#convert-progress").display = False
        self.query_one("#convert-start", Button).disabled = False
        self.query_one("#convert-label", Label).update(message)
        self.result = result
        self.query_one("#convert-open", Button).disabled = result is None
        self.refresh_bindings()
        self.notify(message, severity=severity, timeout=10, markup=False)  # type: ignore[arg-type]
        if result is not None:
            self.refresh_sources()
            self.query_one("#convert-open", Button).focus()

    @on(Button.Pressed, "#convert-open")
    def open_in_chat(self) -> None:
        if self.result is not None:
            self.app.pop_screen()
            self.app.chat_screen.begin_loading(self.result.name)

    def action_cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self.query_one("#convert-label", Label).update("Cancelling…")

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def action_back(self) -> None:
        self.app.pop_screen()
