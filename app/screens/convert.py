"""The Convert screen: pick a model and a target format (from the converter registry, with its size and quality
note, or its install hint), set that target's own options, run it with progress and cancel, then open the result."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, OptionList, ProgressBar, Select, Static, Switch

from pocketlm.app.messages import JobFinished, ProgressMessage
from pocketlm.app.notify import as_pocket_error, notify_error
from pocketlm.app.widgets.conversion_options import OPTION_WIDGETS, TargetOptions, VerifyAfterConverting
from pocketlm.app.worker_progress import ProgressRelay, new_job_id
from pocketlm.converters.quant_types import UNQUANTIZED_TYPES
from pocketlm.converters.registry import ConversionTarget, conversion_targets, refuse_unavailable, unavailable_error
from pocketlm.models.errors import Cancelled, PocketError
from pocketlm.models.fit import human_bytes
from pocketlm.models.progress import ProgressUpdate
from pocketlm.models.store import LocalModel

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp
    from pocketlm.app.verification import AfterConvert
    from pocketlm.converters.base import ConvertOptions


@dataclass(frozen=True)
class Converted:
    """A finished job's result: the new model and, when the switch was on, what verifying it came to."""

    model: LocalModel
    verification: AfterConvert | None = None


@dataclass(frozen=True)
class VerificationUpdate(ProgressUpdate):
    """The verification's progress after a conversion: shown like the conversion's, kept apart from last_progress."""


def convertible(model: LocalModel) -> bool:
    """Whether some registered converter takes `model` somewhere: to another format (a checkpoint to GGUF or GPTQ),
    or through its own format's quantizer, which starts from unquantized weights (an f16 GGUF, not a Q4_K_M one)."""
    from pocketlm.converters.registry import converter_classes, reachable_formats

    if reachable_formats(model.format):
        return True
    quantizers = {c.target_format for c in converter_classes() if c.target_format in c.source_formats}
    return model.format in quantizers and model.quantization in UNQUANTIZED_TYPES


class ConvertScreen(Screen[None]):
    BINDINGS = [Binding("escape", "back_or_cancel", "Back / Cancel"), Binding("ctrl+x", "cancel", "Cancel")]

    app: PocketApp  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self._targets: dict[str, ConversionTarget] = {}
        self._cancel: threading.Event | None = None
        self._job: int | None = None
        self.last_progress: ProgressUpdate | None = None  # the newest conversion progress shown (tests read it)
        self.last_verification_progress: ProgressUpdate | None = None  # and the newest of the verification after it
        self.result: LocalModel | None = None
        self.verification: AfterConvert | None = None  # what verifying the latest result came to (tests read it)
        self._select_on_mount: str | None = None

    def compose(self) -> ComposeResult:
        # Read here, not at start-up: loading the converters imports numpy, which the app's first paint must not wait for.
        self._targets = {t.format: t for t in conversion_targets()}
        yield Header()
        with VerticalScroll(id="convert-form"):  # a short terminal scrolls the form rather than cutting it
            with Horizontal(classes="option-row"):
                with Vertical():
                    yield Label("Model (a checkpoint, or an unquantized GGUF)")
                    yield Select([], prompt="choose a model", id="convert-source")
                with Vertical():
                    yield Label("Convert to")
                    options = [(Text(t.label + ("" if t.available else "  (not installed)")), t.format) for t in self._targets.values()]
                    yield Select(options, value="gguf" if "gguf" in self._targets else Select.NULL, allow_blank=not self._targets,
                                 id="convert-target")  # fmt: skip
            yield Static(id="convert-target-note")
            for target_format in self._targets:
                if widget := OPTION_WIDGETS.get(target_format):
                    yield widget(id=f"{target_format}-options", classes="target-options")
            with Horizontal(classes="buttons"):
                yield Button("Convert", variant="primary", id="convert-start")
                yield Button("Cancel", variant="warning", id="convert-cancel")
                yield Button("Open in chat", id="convert-open", disabled=True)
                yield VerifyAfterConverting(id="convert-verify-row")  # beside the buttons: the form needs no more height
            yield Label("", id="convert-label", markup=False)  # shows model names and errors as written
            yield ProgressBar(id="convert-progress", show_eta=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#convert-progress").display = False
        self.query_one("#convert-cancel").display = False
        self.refresh_sources(select=self._select_on_mount)
        self._show_target()

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

    # The form ---------------------------------------------------------------------------------------------------

    def refresh_sources(self, select: str | None = None) -> None:
        source = self.query_one("#convert-source", Select)
        current = select or (source.value if isinstance(source.value, str) else None)
        models = [m for m in self.app.store.list() if convertible(m)]
        # Text, not str: a str prompt is parsed as markup, and model names are the user's.
        source.set_options([(Text(f"{m.name}  ({m.format} {m.quantization})"), m.name) for m in models])
        if current in {m.name for m in models}:
            source.value = current
        self._show_source()

    def source_model(self) -> LocalModel | None:
        value = self.query_one("#convert-source", Select).value
        return self.app.store.get(value) if isinstance(value, str) else None

    @property
    def target(self) -> ConversionTarget | None:
        value = self.query_one("#convert-target", Select).value
        return self._targets.get(value) if isinstance(value, str) else None

    def target_options(self) -> TargetOptions | None:
        target = self.target
        found = self.query(f"#{target.format}-options") if target is not None else []
        return found[0] if found and isinstance(found[0], TargetOptions) else None  # type: ignore[index]

    @on(Select.Changed, "#convert-target")
    def _show_target(self) -> None:
        target = self.target
        for options in self.query(TargetOptions):
            options.display = target is not None and options.target_format == target.format
        note = self.query_one("#convert-target-note", Static)
        if target is None:
            note.update("")
        elif target.available:
            note.update(Content(target.summary))
        else:
            missing = unavailable_error(target)  # the sentence `pocketlm convert --to` says too
            note.update(Content.from_markup("$summary\n[b]$message[/b] $hint", summary=target.summary, message=missing.message, hint=missing.hint))
        self._show_source()

    @on(Select.Changed)
    @on(Input.Changed, ".target-options Input")
    @on(Switch.Changed)
    def _show_source(self, event: object = None) -> None:
        if isinstance(event, Select.Changed) and event.select.id == "convert-target":
            return  # _show_target calls this once it has switched the panels
        if (options := self.target_options()) is not None:
            options.show_source(self.source_model())

    # Running ----------------------------------------------------------------------------------------------------

    @on(Button.Pressed, "#convert-start")
    @on(OptionList.OptionSelected, "#convert-quant")
    def start(self) -> None:
        from pocketlm.converters.base import ConversionError, ConvertOptions
        from pocketlm.converters.conversion_job import plan_conversion
        if self.running:
            return
        model, target, panel = self.source_model(), self.target, self.target_options()
        if model is None or target is None:
            self.notify("Choose a model and a format to convert it to first.", severity="warning")
            return
        try:
            refuse_unavailable(target)  # an uninstalled target is selectable, so that the button can say what to install
            cancel = threading.Event()
            options = ConvertOptions(settings=panel.settings() if panel is not None else None, cancel=cancel)
            plan_conversion(self.app.store, model, target.format, options)  # refuses what it can before any work
        except (PocketError, ValueError) as error:
            problem = error if isinstance(error, PocketError) else ConversionError(str(error))
            self.query_one("#convert-label", Label).update(str(problem))
            notify_error(self, problem, title="Cannot convert")
            return
        self._cancel, self._job, self.last_progress, self.last_verification_progress = cancel, new_job_id(), None, None
        self.query_one("#convert-start", Button).disabled = True
        self.query_one("#convert-open", Button).disabled = True
        self.query_one("#convert-cancel").display = True
        self.query_one("#convert-progress").display = True
        self.query_one("#convert-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#convert-label", Label).update(f"Converting {model.name} to {target.label}…")
        self.refresh_bindings()
        verify = self.query_one(VerifyAfterConverting).value
        self.convert(model, target.format, options, ProgressRelay(self, self._job), verify)

    @work(thread=True, group="convert")
    def convert(self, model: LocalModel, target_format: str, options: ConvertOptions, relay: ProgressRelay, verify: bool = True) -> None:
        from pocketlm.app.verification import verify_after_convert
        from pocketlm.converters.conversion_job import convert_model

        latest: list[ProgressUpdate] = []

        def converting(update: ProgressUpdate) -> None:
            latest[:] = [update]
            relay(update)

        try:
            result = convert_model(self.app.store, model, target_format, options, converting)
        except Exception as error:  # noqa: BLE001 - a surprise in a worker becomes a notification, not a crash
            relay.finish(error=as_pocket_error("The conversion", error))
            return
        verification = None
        if verify:  # the conversion stands whatever this comes to: verify_after_convert turns a failure into a note
            if latest:  # the relay keeps only the newest update: the conversion's last one is shown before the verification's replace it
                self.post_message(ProgressMessage(relay.job, latest[0]))

            def show(update: ProgressUpdate) -> None:
                relay(VerificationUpdate(update.description, update.completed, update.total))

            verification = verify_after_convert(self.app.store, result, self.app.load_options, options.cancel, show)
        relay.finish(result=Converted(result, verification))

    @on(ProgressMessage)
    def _show_progress(self, message: ProgressMessage) -> None:
        if message.job != self._job:  # a finished job's late message
            return
        update = message.update
        if isinstance(update, VerificationUpdate):
            self.last_verification_progress = update
        else:
            self.last_progress = update
        self.query_one("#convert-label", Label).update(update.description)
        self.query_one("#convert-progress", ProgressBar).update(total=update.total, progress=update.completed)

    @on(JobFinished)
    def _finished(self, message: JobFinished) -> None:
        if message.job != self._job:
            return
        self._cancel = self._job = None
        self.query_one("#convert-progress").display = False
        self.query_one("#convert-cancel").display = False
        self.query_one("#convert-start", Button).disabled = False
        self.refresh_bindings()
        converted = message.result if isinstance(message.result, Converted) else None
        result = converted.model if converted is not None else None
        self.result, self.verification = result, converted.verification if converted is not None else None
        self.query_one("#convert-open", Button).disabled = result is None
        if message.error is not None or result is None:
            error = message.error or PocketError("The conversion ended without a result.")
            self.query_one("#convert-label", Label).update(str(error))
            notify_error(self, error, title="Conversion cancelled" if isinstance(error, Cancelled) else "Conversion failed")
            self.query_one("#convert-start", Button).focus()  # disabling it while running sent the focus elsewhere
            return
        text = f"{result.name} is ready ({human_bytes(result.size_bytes)})."
        severity = "information"
        if self.verification is not None:
            text, severity = self._with_verification(text, self.verification)
        self.query_one("#convert-label", Label).update(text)
        self.notify(text, timeout=10 if severity != "error" else 30, markup=False, severity=severity)  # type: ignore[arg-type]
        self.refresh_sources()
        if self.app.models_screen.is_mounted:
            self.app.models_screen.refresh_local(select=result.name)
        self.query_one("#convert-open", Button).focus()

    @staticmethod
    def _with_verification(text: str, verification: AfterConvert) -> tuple[str, str]:
        """The ready line with the verdict (and what to do when it is broken), and the notification's severity."""
        from pocketlm.app.verification import verdict_line

        record = verification.record
        if record is None:
            return f"{text} {verification.note}", "information"
        verdict = f"{text} Verified: {verdict_line(record)}."
        if record.broken:
            return f"{verdict} {record.advice} It is kept for you to look at.", "error"
        return verdict, "information"

    @on(Button.Pressed, "#convert-open")
    def open_in_chat(self) -> None:
        if self.result is not None:
            self.app.pop_screen()
            self.app.chat_screen.begin_loading(self.result.name)

    @on(Button.Pressed, "#convert-cancel")
    def action_cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self.query_one("#convert-label", Label).update("Cancelling…")

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()

    def action_back_or_cancel(self) -> None:
        """Escape cancels a running conversion first; otherwise it goes back."""
        if self.running:
            self.action_cancel()
        else:
            self.app.pop_screen()
