"""The pull under way: what is being fetched, a progress bar with speed and time left, and Cancel."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Label, ProgressBar

from pocketlm.app.messages import JobFinished, ProgressMessage
from pocketlm.app.notify import as_pocket_error, notify_error
from pocketlm.app.worker_progress import ProgressRelay, new_job_id
from pocketlm.models.errors import Cancelled
from pocketlm.models.fit import human_bytes
from pocketlm.models.store import LocalModel

if TYPE_CHECKING:
    from pocketlm.app.pocket_app import PocketApp

_SPEED_WINDOW_S = 3.0


class PullPanel(Vertical):
    class Pulled(Message):
        """A pull finished and registered `model`."""

        def __init__(self, model: LocalModel) -> None:
            super().__init__()
            self.model = model

    class Ended(Message):
        """A pull ended, whatever its outcome (so the screen can update its key bindings)."""

    app: PocketApp  # type: ignore[assignment]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._cancel: threading.Event | None = None
        self._job: int | None = None
        self._speed_samples: list[tuple[float, int]] = []

    def compose(self) -> ComposeResult:
        yield Label("", id="pull-label", markup=False)  # shows specs, file names and errors as written
        with Horizontal(id="pull-row"):
            yield ProgressBar(id="pull-progress", show_eta=True)
            yield Label("", id="pull-speed")
            yield Button("Cancel", id="pull-cancel", variant="warning")

    def on_mount(self) -> None:
        self.display = False

    @property
    def pulling(self) -> bool:
        return self._cancel is not None

    def start(self, spec: str) -> None:
        if self.pulling:
            self.notify("One pull at a time: wait for this one, or cancel it (Ctrl+X).", severity="warning")
            return
        self._cancel = threading.Event()
        self._job = new_job_id()
        self._speed_samples = []
        self.display = True
        self.query_one("#pull-label", Label).update(f"Looking up {spec}…")
        self.query_one("#pull-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#pull-speed", Label).update("")
        self._pull(spec, self._cancel, ProgressRelay(self, self._job))

    @work(thread=True, group="pull")
    def _pull(self, spec: str, cancel: threading.Event, relay: ProgressRelay) -> None:
        from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull

        try:
            model = run_pull(plan_pull(parse_pull_spec(spec)), self.app.store, relay, cancel)
        except Cancelled as error:
            relay.finish(error=Cancelled(error.message, "Pull it again to resume."))
        except Exception as error:  # noqa: BLE001 - a worker's surprise must become a notification, not end the app
            relay.finish(error=as_pocket_error("The pull", error))
        else:
            relay.finish(result=model)

    @on(ProgressMessage)
    def _show_progress(self, message: ProgressMessage) -> None:
        if message.job != self._job:
            return
        update = message.update
        self.query_one("#pull-label", Label).update(update.description)
        self.query_one("#pull-progress", ProgressBar).update(total=update.total, progress=update.completed)
        now = time.monotonic()
        self._speed_samples = [(t, n) for t, n in self._speed_samples if now - t < _SPEED_WINDOW_S] + [(now, update.completed)]
        (start, first), (_, last) = self._speed_samples[0], self._speed_samples[-1]
        if now - start > 0.2:
            self.query_one("#pull-speed", Label).update(f"{human_bytes(int((last - first) / (now - start)))}/s")

    @on(JobFinished)
    def _finished(self, message: JobFinished) -> None:
        if message.job != self._job:
            return
        self._cancel = self._job = None
        self.display = False
        if message.error is not None:
            notify_error(self, message.error, title="Pull stopped" if isinstance(message.error, Cancelled) else "Pull failed")
        elif isinstance(message.result, LocalModel):
            self.notify(f"{message.result.name} is ready: press Enter to chat with it.", timeout=10, markup=False)
            self.post_message(self.Pulled(message.result))
        self.post_message(self.Ended())

    def stop(self) -> None:
        """Ask a running pull to stop (safe at any time, also while the app shuts down)."""
        if self._cancel is not None:
            self._cancel.set()

    @on(Button.Pressed, "#pull-cancel")
    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self.query_one("#pull-label", Label).update("Cancelling…")
