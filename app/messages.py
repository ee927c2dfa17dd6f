"""Messages that workers post to the app's screens."""

from __future__ import annotations

from textual.message import Message

from pocketlm.backends.base import ChatModel, GenerationEvent


class GenerationUpdate(Message):
    """One event of the reply being streamed (a text piece, a trim notice, or the final stats)."""

    def __init__(self, event: GenerationEvent) -> None:
        super().__init__()
        self.event = event


class GenerationFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ModelLoaded(Message):
    def __init__(self, model: ChatModel, serial: int) -> None:
        super().__init__()
        self.model = model
        self.serial = serial


class ModelLoadFailed(Message):
    def __init__(self, error: str, serial: int) -> None:
        super().__init__()
        self.error = error
        self.serial = serial
