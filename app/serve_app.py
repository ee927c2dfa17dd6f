"""The FastAPI application of `pocketlm serve`: the OpenAI routes (serve_routes) behind an API key, a body size limit,
and OpenAI-style error bodies for every 4xx ({"error": {"message", "type", "param", "code"}}) in place of FastAPI's."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
from collections import deque
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketlm.app.serve_errors import ServeError
from pocketlm.app.serve_pool import ModelPool
from pocketlm.app.serve_routes import ServedRequest, build_router, error_body
from pocketlm.app.serve_schema import ErrorBody, ErrorDetail
from pocketlm.app.serve_settings import ServeSettings
from pocketlm.models.errors import PocketError
from pocketlm.models.store import ModelStore

_LOG_LENGTH = 200  # finished requests kept for the log


class Unauthorized(ServeError):
    status = 401
    type = "invalid_request_error"


def create_app(store: ModelStore, settings: ServeSettings) -> FastAPI:
    pool = ModelPool(store, settings)
    log = RequestLog(maxlen=_LOG_LENGTH)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.preload(settings.models)
        reaper = asyncio.create_task(pool.reap_forever())
        try:
            yield
        finally:
            reaper.cancel()
            pool.close()

    app = FastAPI(title="pocketlm", summary="OpenAI-compatible API for pocketlm's local models", lifespan=lifespan)
    app.state.pool = pool
    app.state.requests = log
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(build_router(pool, log), dependencies=[Depends(_key_check(settings.api_key))])
    _answer_errors_as_openai(app)
    return app


class RequestLog(deque[ServedRequest]):
    """The latest finished requests, and how many finished since the server started (the app shows that count)."""

    def __init__(self, maxlen: int) -> None:
        super().__init__(maxlen=maxlen)
        self._counter = itertools.count(1)
        self.total = 0

    def append(self, request: ServedRequest) -> None:
        super().append(request)
        # next() on itertools.count is atomic under the GIL: generations end on their own threads.
        self.total = max(self.total, next(self._counter))


def _key_check(api_key: str | None):  # type: ignore[no-untyped-def]
    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: how much of a wrong key matched must not show in the answer's timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise Unauthorized("The API key is missing or wrong.", "Send it as `Authorization: Bearer KEY`.", code="invalid_api_key")

    return check


def _answer_errors_as_openai(app: FastAPI) -> None:
    @app.exception_handler(PocketError)
    async def pocket_error(_: Request, error: PocketError) -> JSONResponse:
        # The routes check requests before the engine sees them: any other PocketError is the server's (a closed model).
        status = error.status if isinstance(error, ServeError) else 500
        return JSONResponse(error_body(error).model_dump(), status_code=status)

    @app.exception_handler(Exception)
    async def unforeseen(_: Request, error: Exception) -> JSONResponse:
        # Still OpenAI's shape, so a client shows a message rather than failing to parse a plain-text 500.
        detail = ErrorDetail(message=f"The server failed unexpectedly: {type(error).__name__}: {error}", type="server_error")
        return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(where) or 'the body'}: {first.get('msg', 'is not valid')}."
        detail = ErrorDetail(message=f"Invalid request: {message}", type="invalid_request_error", param=".".join(where) or None, code="invalid_body")
        return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        detail = ErrorDetail(message=str(error.detail), type=kind, code=str(error.status_code))
        return JSONResponse(ErrorBody(error=detail).model_dump(), status_code=error.status_code, headers=error.headers)


class BodyLimit:
    """Refuse (413) a request body over `max_bytes`, counted as it arrives, before anything parses it: a client must
    not make the server hold an unbounded body, whether or not it sent Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body, messages = 0, []
        more = scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += len(message.get("body", b""))
            if body > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        await self.app(scope, _replay(messages, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = ErrorDetail(message=f"The request body is over {self.max_bytes} bytes.", type="invalid_request_error", code="body_too_large")
        await JSONResponse(ErrorBody(error=detail).model_dump(), status_code=413)(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
