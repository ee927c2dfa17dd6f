"""The Chat screen's adapter panel: the LoRA adapters attached to the open model, each with an on/off switch, a
scale slider and a remove button, and a button to attach another.

The panel holds what the user asked for and applies it to the live model (ChatModel.set_adapters) in a worker, never
on the UI thread: a first attach may convert a PEFT adapter for the backend (seconds, shown as progress), and
set_adapters waits for a streaming reply to end. Changes made while one is being applied are coalesced: when it is
done, the newest wanted set is applied next. A set the model refuses is a notification, and the panel shows again the
set that is still active. AdaptersApplied bubbles up to the screen, which shows the model's adapters in the status line.

When another model starts loading the panel lets go of the open one (model_closing): the screen closes it once the new
one is loaded, and no worker may touch it then. A conversion in progress is cancelled when the adapter it is for is
removed, the model let go of, or the panel unmounted (the app quitting).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Label, Static, Switch

from pocketlm.app.widgets.scale_slider import ScaleSlider

if TYPE_CHECKING:
    from pocketlm.app.messages import AdaptersApplied, AdaptersFailed, JobFinished, ProgressMessage
    from pocketlm.app.pocket_app import PocketApp
    from pocketlm.app.worker_progress import ProgressRelay
    from pocketlm.backends.base import AdapterSpec, ChatModel


@dataclass(frozen=True)
class AttachedAdapter:
    name: str  # the adapter's store name, as the user picked it
    scale: float = 1.0
    enabled: bool = True  # a switched-off adapter stays in the panel, with its scale, but out of the model's set


class AdapterRow(Vertical):
    """One attached adapter: its name, then its switch, scale slider and remove button."""

    def __init__(self, adapter: AttachedAdapter) -> None:
        super().__init__(classes="adapter-row")
        self.adapter = adapter

    def compose(self) -> ComposeResult:
        yield Label(self.adapter.name, markup=False, classes="adapter-name")  # the user's name, never markup
        with Horizontal(classes="adapter-controls"):
            yield Switch(self.adapter.enabled, animate=False, tooltip="Use this adapter")
            yield ScaleSlider(self.adapter.scale)
            yield Button("✕", classes="adapter-remove", tooltip="Detach this adapter")


class AdapterPanel(Vertical):
    app: PocketApp  # type: ignore[assignment]

    def __init__(self, reply_running: Callable[[], bool], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._reply_running = reply_running  # whether the screen is streaming a reply: a change then waits for its end
        self._model: ChatModel | None = None
        self._applied: tuple[AttachedAdapter, ...] = ()  # what the model runs with (switched-off ones included)
        self._wanted: tuple[AttachedAdapter, ...] = ()  # what the user asked for last
        self._applying: ChatModel | None = None  # the model a worker is changing now
        self._job = 0  # the job whose progress the note shows
        self._cancel = threading.Event()  # set to stop the conversion the worker is making (a new one per apply)
        # Rows are replaced by awaits (remove, then mount): two at once (a model loaded while the user attaches one)
        # would interleave into doubled rows.
        self._rows_lock = asyncio.Lock()
        # The open model's adapters as the backend takes them, by name: a rescale or a toggle never converts again.
        self._specs: dict[str, AdapterSpec] = {}

    def compose(self) -> ComposeResult:
        yield Label("LoRA adapters", classes="title")
        yield Button("Add adapter", id="add-adapter", variant="primary")
        yield VerticalScroll(id="adapter-rows", can_focus=False)  # Tab goes from "Add adapter" to the first switch
        yield Static("", id="adapter-note", markup=False)

    @property
    def adapters(self) -> tuple[AttachedAdapter, ...]:
        """The adapters as the panel shows them now."""
        return tuple(row.adapter for row in self.query(AdapterRow))

    @property
    def applying(self) -> bool:
        """Whether a worker is changing a model's adapters (its model must not be closed meanwhile)."""
        return self._applying is not None

    def model_closing(self) -> None:
        """Let go of the open model (another one is loading, or the app is quitting): changes wait for the next one."""
        self._model = None
        self._cancel.set()

    async def model_loaded(self, model: ChatModel) -> None:
        """Show the adapters `model` was loaded with (LoadOptions.adapters) as the attached set."""
        self._model = model
        self._specs = {spec.label: spec for spec in model.description.adapters}
        self._applied = self._wanted = tuple(AttachedAdapter(spec.label, spec.scale) for spec in model.description.adapters)
        self.note("")
        await self.show(self._applied)

    async def show(self, adapters: tuple[AttachedAdapter, ...]) -> None:
        """Show `adapters` as attached, without applying anything."""
        rows = self.query_one("#adapter-rows", VerticalScroll)
        async with self._rows_lock:
            await rows.remove_children()
            await rows.mount_all([AdapterRow(adapter) for adapter in adapters])

    async def attach(self, name: str, scale: float = 1.0) -> None:
        """Attach `name` at `scale`, switched on (one attached already is switched on at its own scale)."""
        model = self._model
        if any(adapter.name == name for adapter in self.adapters):
            await self.show(tuple(replace(a, enabled=True) if a.name == name else a for a in self.adapters))
        else:
            async with self._rows_lock:
                await self.query_one("#adapter-rows", VerticalScroll).mount(AdapterRow(AttachedAdapter(name, scale)))
        if self._model is not model:
            # Another model arrived while the row was mounted: the panel shows that model's set, and nothing of the
            # change is applied to it (nor to the one it replaced).
            await self.show(self._applied)
            return
        self._want(self.adapters)

    def note(self, text: str) -> None:
        """A line under the adapters: a conversion's progress, "applies when the reply ends"; "" clears it."""
        self.query_one("#adapter-note", Static).update(text)

    # Applying --------------------------------------------------------------------------------------------------

    def _want(self, adapters: tuple[AttachedAdapter, ...]) -> None:
        self._wanted = adapters
        self._apply_next()

    def _apply_next(self) -> None:
        model = self._model
        if model is None or self._applying is not None or self._wanted == self._applied:
            return
        from pocketlm.app.worker_progress import ProgressRelay, new_job_id

        self._applying = model
        self._job = new_job_id()
        self._cancel = threading.Event()
        self.note("Applies when the reply ends…" if self._reply_running() else "Applying…")
        self._apply(model, self._wanted, ProgressRelay(self, self._job), self._cancel)

    @work(thread=True, group="adapters", exit_on_error=False)
    def _apply(self, model: ChatModel, wanted: tuple[AttachedAdapter, ...], relay: ProgressRelay, cancel: threading.Event) -> None:
        from pocketlm.app.messages import AdaptersApplied, AdaptersFailed
        from pocketlm.app.notify import as_pocket_error

        try:
            model.set_adapters(self._specs_for(model, wanted, relay, cancel))
        except Exception as error:  # noqa: BLE001 - a refused adapter is a notification, never a dead worker
            relay.finish()
            self.post_message(AdaptersFailed(model, wanted, as_pocket_error("Applying the adapters", error)))
            return
        relay.finish()
        self.post_message(AdaptersApplied(model, wanted))

    def _specs_for(self, model: ChatModel, wanted: tuple[AttachedAdapter, ...], relay: ProgressRelay,
                   cancel: threading.Event) -> list[AdapterSpec]:  # fmt: skip
        """The switched-on adapters of `wanted` as `model`'s backend takes them (converted on first use, until `cancel`
        is set; worker thread)."""
        from pocketlm.app.adapter_loading import adapter_spec_for
        from pocketlm.app.model_loading import choose_model

        specs: list[AdapterSpec] = []
        for adapter in (a for a in wanted if a.enabled):
            spec = self._specs.get(adapter.name)
            if spec is None:
                base = choose_model(self.app.store, model.description.name)
                spec = adapter_spec_for(self.app.store, adapter.name, adapter.scale, model.description.backend, base, relay, cancel)
                self._specs[adapter.name] = spec
            # Named as the user picked it: the status line and the history show that name, not a conversion's.
            specs.append(replace(spec, scale=adapter.scale, name=adapter.name))
        return specs

    def on_adapters_applied(self, message: AdaptersApplied) -> None:
        # Not stopped: the screen shows the model's new adapters in the status line.
        self._applying = None
        if message.model is self._model:
            self._applied = message.requested
            self.note("")
        self._apply_next()

    async def on_adapters_failed(self, message: AdaptersFailed) -> None:
        from pocketlm.app.notify import notify_error
        from pocketlm.models.errors import Cancelled

        message.stop()
        self._applying = None
        if message.model is not self._model or isinstance(message.error, Cancelled):
            # Stopped because the user removed the adapter being converted (or let go of the model): nothing to say,
            # and what they want now is applied next.
            self.note("")
            self._apply_next()
            return
        notify_error(self, message.error, title="Could not apply the adapters")
        # The model kept its adapters: so does the panel, dropping the changes made since the refused one was asked.
        self._wanted = self._applied
        self.note("")
        await self.show(self._applied)

    def on_progress_message(self, message: ProgressMessage) -> None:
        message.stop()
        if message.job == self._job and self._applying is not None:
            update = message.update
            done = f" {update.completed}/{update.total}" if update.total else ""
            self.note(f"{update.description}{done}")

    def on_job_finished(self, message: JobFinished) -> None:
        message.stop()  # the worker's own message says how it ended

    # The user's changes ----------------------------------------------------------------------------------------

    @staticmethod
    def _row_of(widget: object) -> AdapterRow:
        node = widget
        while not isinstance(node, AdapterRow):
            node = node.parent  # type: ignore[attr-defined]
        return node

    @on(Button.Pressed, "#add-adapter")
    def _offer_adapters(self, event: Button.Pressed) -> None:
        from pocketlm.app.adapter_loading import stored_adapters
        from pocketlm.app.screens.adapter_picker import AdapterPicker

        event.stop()
        if self._model is None:
            self.notify("No model is open (or one is loading): adapters attach to the open model.", severity="warning")
            return
        attached = {adapter.name for adapter in self.adapters}
        choices = [adapter for adapter in stored_adapters(self.app.store) if adapter.name not in attached]
        if not choices:
            self.notify("No other adapter stored: import one with `pocketlm adapter import PATH`.", severity="warning", markup=False)
            return

        async def picked(name: str | None) -> None:
            if name:
                await self.attach(name)

        self.app.push_screen(AdapterPicker(choices, self._model.description.name), picked)

    @on(Switch.Changed)
    def _switched(self, event: Switch.Changed) -> None:
        event.stop()
        row = self._row_of(event.switch)
        row.adapter = replace(row.adapter, enabled=event.value)
        self._want(self.adapters)

    @on(ScaleSlider.Changed)
    def _rescaled(self, event: ScaleSlider.Changed) -> None:
        event.stop()
        row = self._row_of(event.slider)
        row.adapter = replace(row.adapter, scale=event.value)
        self._want(self.adapters)

    @on(Button.Pressed, ".adapter-remove")
    async def _remove(self, event: Button.Pressed) -> None:
        event.stop()
        removed = self._row_of(event.button)
        await removed.remove()
        if self._applying is not None and removed.adapter.name not in self._specs:
            self._cancel.set()  # it is being converted: stop that; the set without it is applied next
        self._want(self.adapters)

    def on_unmount(self) -> None:
        self._cancel.set()  # quitting must not wait for a conversion
