"""The one exception family users see: a sentence saying what is wrong, and what to do."""

from __future__ import annotations


class PocketError(Exception):
    """An error meant for the user: `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class ModelFileError(PocketError):
    """A model file is missing, not of the expected format, truncated or corrupted."""


class NotEnoughMemory(PocketError):
    """Loading the model would need more memory than this machine has available."""


class ModelNotFound(PocketError):
    """A model name matches nothing (or more than one thing) in the store."""


class BackendUnavailable(PocketError):
    """No installed backend can run this model."""


class ContextOverflow(PocketError):
    """The conversation cannot be made to fit in the model's context window."""


class HubError(PocketError):
    """The Hugging Face Hub could not be reached, or refused or lacks what was asked for."""


class HubUnreachable(HubError):
    """No connection to the Hub at all (as opposed to the Hub refusing or lacking something)."""


class NotEnoughDisk(PocketError):
    """Writing a model would need more free disk space than there is."""


class Cancelled(PocketError):
    """The user stopped a long job; what it had finished is kept where that is useful (a partial download)."""
