"""Messages that workers post to the app's screens."""

from __future__ import annotations

from textual.message import Message

from pocketlm.app.widgets.adapter_panel import AttachedAdapter
from pocketlm.backends.base import ChatModel, GenerationEvent
from pocketlm.models.errors import PocketError
from pocketlm.models.progress import ProgressUpdate


class GenerationUpdate(Message):
    """One event of the reply being streamed (a text piece, a trim notice, or the final stats)."""

    def __init__(self, event: GenerationEvent) -> None:
        super().__init__()
        self.event = event


class GenerationFailed(Message):
    def __init__(self, error: PocketError) -> None:
        super().__init__()
        self.error = error


class ModelLoaded(Message):
    def __init__(self, model: ChatModel, serial: int, device: str = "") -> None:
        super().__init__()
        self.model = model
        self.serial = serial
        self.device = device  # where it runs, for the status line: "CPU, 2 cores", "CUDA: NVIDIA H200, 139.8 GiB"


class ModelLoadFailed(Message):
    def __init__(self, error: PocketError, serial: int) -> None:
        super().__init__()
        self.error = error
        self.serial = serial


class ProgressMessage(Message):
    """The newest progress of a worker's job (see worker_progress.ProgressRelay); `job` tells a stale one apart."""

    def __init__(self, job: int, update: ProgressUpdate) -> None:
        super().__init__()
        self.job = job
        self.update = update


class JobFinished(Message):
    """A worker's job ended: with its result, or with the error to show (a Cancelled when the user stopped it)."""

    def __init__(self, job: int, result: object | None, error: PocketError | None) -> None:
        super().__init__()
        self.job = job
        self.result = result
        self.error = error


class AdaptersApplied(Message):
    """The model now runs with `requested` (the adapter panel's whole set; switched-off ones included)."""

    def __init__(self, model: ChatModel, requested: tuple[AttachedAdapter, ...]) -> None:
        super().__init__()
        self.model = model
        self.requested = requested


class AdaptersFailed(Message):
    """The model refused `requested` and kept the adapters it had."""

    def __init__(self, model: ChatModel, requested: tuple[AttachedAdapter, ...], error: PocketError) -> None:
        super().__init__()
        self.model = model
        self.requested = requested
        self.error = error
