"""Errors a request to `pocketlm serve` can meet, each with the HTTP status and OpenAI error type it is answered with."""

from __future__ import annotations

from pocketlm.models.errors import PocketError


class ServeError(PocketError):
    """Answered as {"error": {"message", "type", "param", "code"}} with `status`, as OpenAI's API does."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, hint: str = "", code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code
        self.param = param


class UnknownModel(ServeError):
    status = 404


class QueueFull(ServeError):
    status = 429
    type = "rate_limit_error"


class QueueTimeout(ServeError):
    status = 503
    type = "server_error"


class ModelUnavailable(ServeError):
    """The model is known but could not be loaded here (memory, a damaged file, no backend)."""

    status = 503
    type = "server_error"
