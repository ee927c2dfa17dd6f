"""The OpenAI endpoints of `pocketlm serve`: /v1/models, /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from pocketlm.app.serve_adapters import adapter_error, request_adapter_specs
from pocketlm.app.serve_errors import ServeError
from pocketlm.app.serve_generation import Generation, StreamFactory
from pocketlm.app.serve_pool import ModelPool, ServedModel
from pocketlm.app.serve_schema import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                                       Completion, CompletionChoice, CompletionRequest, Delta, ErrorBody, ErrorDetail, MessageOut,
                                       ModelCard, ModelList, Usage, _Sampling)  # fmt: skip
from pocketlm.models.errors import PocketError
from pocketlm.backends.base import ChatMessage, ChatModel, GenerationStats, SamplingParams, TextPiece

_ERRORS: dict[int | str, dict[str, object]] = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 503)}
# What finish_reason a stop reason is: the reply ended by itself (or a stop string), or ran out of tokens.
_FINISH = {"end_of_generation": "stop", "stop_string": "stop", "cancelled": "stop", "max_tokens": "length", "context_full": "length"}
# llama.cpp takes a 32-bit seed; OpenAI's is any integer: the same request seed always maps to the same engine seed.
_SEED_RANGE = 2**32


@dataclass(frozen=True)
class ServedRequest:
    """One finished generation, for the server's log (and the app's view of it)."""

    id: str
    model: str
    endpoint: str
    stop_reason: str  # GenerationStats.stop_reason, or "error"
    prompt_tokens: int
    completion_tokens: int
    finished_at: float


def build_router(pool: ModelPool, log: deque[ServedRequest]) -> APIRouter:
    router = APIRouter(prefix="/v1", responses=_ERRORS)

    @router.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        entries = await anyio.to_thread.run_sync(pool.entries)
        return ModelList(data=[ModelCard(id=entry.name, created=entry.created) for entry in entries])

    @router.post("/chat/completions", response_model=ChatCompletion,
                 responses={200: {"content": {"text/event-stream": {}}, "description": "The reply, or its chunks when stream is true."}})  # fmt: skip
    async def chat_completions(body: ChatCompletionRequest, request: Request):  # type: ignore[no-untyped-def]
        messages = [ChatMessage("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        served, model = await pool.acquire(body.model)
        try:
            await anyio.to_thread.run_sync(_use_adapters, pool, served, model, body)
            sampling = await anyio.to_thread.run_sync(_chat_sampling, model, messages, body)
        except BaseException:
            served.release()
            raise
        generation = _start(served, log, body.model, "chat", lambda cancel: model.stream_chat(messages, sampling, cancel))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _event_stream(generation, _chat_chunks(generation, served.choice.name, include_usage))
        text, stats = await _collect(generation, request)
        return ChatCompletion(id=_new_id("chatcmpl"), created=int(time.time()), model=served.choice.name,
                              choices=[ChatChoice(message=MessageOut(content=text), finish_reason=_finish(stats))], usage=_usage(stats))  # fmt: skip

    @router.post("/completions", response_model=Completion,
                 responses={200: {"content": {"text/event-stream": {}}, "description": "The completion, or its chunks when stream is true."}})  # fmt: skip
    async def completions(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
        served, model = await pool.acquire(body.model)
        try:
            await anyio.to_thread.run_sync(_use_adapters, pool, served, model, body)
            prompt, sampling = await anyio.to_thread.run_sync(_completion_sampling, model, body)
        except BaseException:
            served.release()
            raise
        generation = _start(served, log, body.model, "completions", lambda cancel: model.stream_tokens(prompt, sampling, cancel))
        if body.stream:
            return _event_stream(generation, _completion_chunks(generation, served.choice.name))
        text, stats = await _collect(generation, request)
        return Completion(id=_new_id("cmpl"), created=int(time.time()), model=served.choice.name,
                          choices=[CompletionChoice(text=text, finish_reason=_finish(stats))], usage=_usage(stats))  # fmt: skip

    return router


def _use_adapters(pool: ModelPool, served: ServedModel, model: ChatModel, body: _Sampling) -> None:
    """Make the request's adapters (none: the bare model) the model's active set, holding its turn: the set is the
    model's state, so it is set by every request before its reply, and no other reply runs until this one ended."""
    specs = request_adapter_specs(pool.store, served.choice, body.adapters)
    if not specs and not model.description.adapters:
        return  # nothing to change, and a backend without adapters (remote) is never asked
    try:
        model.set_adapters(specs)
    except PocketError as error:  # a GGUF LoRA llama.cpp refuses for this model, an adapter listed twice
        raise adapter_error(error) from None


def _sampling(body: _Sampling, max_tokens: int | None) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        max_tokens=max_tokens,
        seed=None if body.seed is None else body.seed % _SEED_RANGE,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
    )


def _too_long(prompt_tokens: int, context_length: int) -> ServeError:
    return ServeError(f"The prompt takes {prompt_tokens} tokens; the model's context holds {context_length}, the reply included.",
                      "Send a shorter prompt.", code="context_length_exceeded", param="messages")  # fmt: skip


def _require_room(prompt_tokens: int, max_tokens: int | None, context_length: int) -> int:
    """The reply's token budget: max_tokens if prompt and reply fit the context (400 otherwise), else what is left."""
    room = context_length - prompt_tokens
    if room < 1:
        raise _too_long(prompt_tokens, context_length)
    if max_tokens is not None and max_tokens > room:
        raise ServeError(f"max_tokens is {max_tokens}, but only {room} tokens are left in the context after the prompt's {prompt_tokens}.",
                         f"Ask for at most {room} tokens.", code="context_length_exceeded", param="max_tokens")  # fmt: skip
    return max_tokens or room


def _chat_sampling(model: ChatModel, messages: list[ChatMessage], body: ChatCompletionRequest) -> SamplingParams:
    """The request's sampling, refused with a 400 when the conversation and reply would not fit. The budget is always
    set: stream_chat then never drops old turns to make room, which a server must not do silently."""
    prompt_tokens = model.prompt_tokens(messages)
    wanted = body.max_completion_tokens or body.max_tokens
    return _sampling(body, _require_room(prompt_tokens, wanted, model.description.context_length))


def _completion_sampling(model: ChatModel, body: CompletionRequest) -> tuple[list[int], SamplingParams]:
    prompt = model.tokenize(body.prompt_text())
    if not prompt:
        raise ServeError("The prompt is empty.", "Send some text to continue.", code="empty_prompt", param="prompt")
    return prompt, _sampling(body, _require_room(len(prompt), body.max_tokens, model.description.context_length))


def _start(served: ServedModel, log: deque[ServedRequest], model: str, endpoint: str, stream: StreamFactory) -> Generation:
    request_id = _new_id("req")

    def ended(generation: Generation) -> None:
        served.release()
        stats = generation.stats
        log.append(ServedRequest(request_id, served.choice.name, endpoint, stats.stop_reason if stats else "error",
                                 stats.prompt_tokens if stats else 0, stats.generated_tokens if stats else 0, time.time()))  # fmt: skip

    return Generation(stream, ended).start()


async def _collect(generation: Generation, request: Request) -> tuple[str, GenerationStats]:
    """The whole reply; a client that hangs up before it is done cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, generation.cancel))
    pieces: list[str] = []
    stats: GenerationStats | None = None
    try:
        async for event in generation.events():
            if isinstance(event, TextPiece):
                pieces.append(event.text)
            elif isinstance(event, GenerationStats):
                stats = event
    finally:
        watcher.cancel()
    assert stats is not None  # every stream ends with its GenerationStats
    return "".join(pieces), stats


async def _cancel_on_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    cancel()


def _event_stream(generation: Generation, chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
        except PocketError as error:  # the status is sent already: the error goes in the stream, as OpenAI does
            yield f"data: {error_body(error).model_dump_json()}\n\n"
        finally:
            generation.cancel()  # a no-op once the stream ended; a hang-up mid-stream lands here
        yield "data: [DONE]\n\n"

    # The background task covers a hang-up before the body started, when `lines` never ran to reach its finally.
    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(generation.cancel))  # fmt: skip


async def _chat_chunks(generation: Generation, model: str, include_usage: bool) -> AsyncIterator[BaseModel]:
    chunk_id, created = _new_id("chatcmpl"), int(time.time())

    def chunk(delta: Delta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])

    yield chunk(Delta(role="assistant", content=""))
    async for event in generation.events():
        if isinstance(event, TextPiece) and event.text:
            yield chunk(Delta(content=event.text))
        elif isinstance(event, GenerationStats):
            yield chunk(Delta(), _finish(event))
            if include_usage:
                yield ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=_usage(event))


async def _completion_chunks(generation: Generation, model: str) -> AsyncIterator[BaseModel]:
    chunk_id, created = _new_id("cmpl"), int(time.time())
    async for event in generation.events():
        if isinstance(event, TextPiece) and event.text:
            yield Completion(id=chunk_id, created=created, model=model, choices=[CompletionChoice(text=event.text)])
        elif isinstance(event, GenerationStats):
            yield Completion(id=chunk_id, created=created, model=model, choices=[CompletionChoice(text="", finish_reason=_finish(event))],
                             usage=_usage(event))  # fmt: skip


def _finish(stats: GenerationStats):  # type: ignore[no-untyped-def]
    return _FINISH[stats.stop_reason]


def _usage(stats: GenerationStats) -> Usage:
    return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.generated_tokens,
                 total_tokens=stats.prompt_tokens + stats.generated_tokens)  # fmt: skip


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(error: PocketError) -> ErrorBody:
    """OpenAI's error object for `error`; a PocketError that is not a ServeError is the engine's: a server error."""
    message = f"{error.message} {error.hint}".strip()
    if isinstance(error, ServeError):
        return ErrorBody(error=ErrorDetail(message=message, type=error.type, param=error.param, code=error.code))
    return ErrorBody(error=ErrorDetail(message=message, type="server_error"))
