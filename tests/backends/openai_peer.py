"""A small OpenAI-compatible server on loopback for the remote backend's tests: FastAPI + uvicorn (the stack
`pocketlm serve` uses), answering with a real pocketlm ChatModel (llama.cpp on the tiny GGUF), never canned text.

GET /v1/models, POST /v1/chat/completions (streaming with usage, and not), POST /v1/completions (token ids) and POST
/tokenize (as llama-server and vLLM offer), Bearer key checked when one is set.
It records each request's body, so tests can check what the remote backend sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pocketlm.backends.base import ChatMessage, ChatModel, GenerationStats, SamplingParams, TextPiece


@dataclass
class PeerRecord:
    requests: list[dict[str, Any]] = field(default_factory=list)


def _app(model: ChatModel, model_id: str, api_key: str | None, record: PeerRecord) -> FastAPI:
    # FastAPI reads the handlers' annotations (Request) from this module's globals: imported at the top for that.
    app = FastAPI()
    lock = threading.Lock()  # one generation at a time: a ChatModel streams one reply at a time

    def refused(request: Request) -> JSONResponse | None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "Invalid API key.", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}, 401)
        return None

    @app.get("/v1/models")
    def models(request: Request):  # type: ignore[no-untyped-def]
        if (refusal := refused(request)) is not None:
            return refusal
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "test", "max_model_len": model.description.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")  # llama-server's and vLLM's route beside /v1 (not OpenAI's API)
    async def tokenize(request: Request):  # type: ignore[no-untyped-def]
        if (refusal := refused(request)) is not None:
            return refusal
        body = await request.json()
        with lock:
            return {"tokens": model.tokenize(body["prompt"])}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # type: ignore[no-untyped-def]
        return await _generation(request, "chat.completion")

    @app.post("/v1/completions")  # prompt as token ids only: what the remote backend's stream_tokens sends
    async def completions(request: Request):  # type: ignore[no-untyped-def]
        return await _generation(request, "text_completion")

    async def _generation(request: Request, kind: str):  # type: ignore[no-untyped-def]
        if (refusal := refused(request)) is not None:
            return refusal
        body = await request.json()
        record.requests.append(body)
        if body.get("model") != model_id:
            return JSONResponse({"error": {"message": f"The model {body.get('model')!r} does not exist.", "type": "invalid_request_error",
                                           "param": "model", "code": "model_not_found"}}, 404)  # fmt: skip
        messages = [ChatMessage(m["role"], m["content"]) for m in body.get("messages", ())]
        stop = body.get("stop") or ()
        sampling = SamplingParams(temperature=body.get("temperature", 0.7), top_p=body.get("top_p", 0.95), max_tokens=body.get("max_tokens"),
                                  seed=body.get("seed"), ignore_eos=bool(body.get("ignore_eos")), stop=tuple([stop] if isinstance(stop, str) else stop))  # fmt: skip
        cancel = threading.Event()

        def generate(put: Callable[[tuple[str, GenerationStats | None] | None], None]) -> None:
            """The reply, piece by piece, into `put`; in a thread of its own, so a client that goes away (the
            streaming task cancelled) sets `cancel` and the lock is released as soon as the model stops."""
            try:
                with lock:
                    events = model.stream_chat(messages, sampling, cancel) if kind == "chat.completion" else model.stream_tokens(body["prompt"], sampling, cancel)
                    for event in events:
                        if isinstance(event, TextPiece):
                            put((event.text, None))
                        elif isinstance(event, GenerationStats):
                            put(("", event))
            finally:
                put(None)

        def finish(stats: GenerationStats) -> str:
            return "length" if stats.stop_reason in ("max_tokens", "context_full") else "stop"

        def usage(stats: GenerationStats) -> dict[str, int]:
            return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                    "total_tokens": stats.prompt_tokens + stats.generated_tokens}  # fmt: skip

        chunk = {"id": "test", "object": kind + (".chunk" if kind == "chat.completion" else ""), "created": int(time.time()), "model": model_id}

        def choice(piece: str, reason: str | None) -> dict[str, Any]:
            if kind == "chat.completion":
                return {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": reason}
            return {"index": 0, "text": piece, "finish_reason": reason, "logprobs": None}
        if not body.get("stream"):
            text, stats, results = "", None, []
            await asyncio.to_thread(generate, results.append)
            for piece, final in filter(None, results):
                text, stats = text + piece, final or stats
            assert stats is not None
            return {"id": "chatcmpl-test", "object": "chat.completion", "created": chunk["created"], "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish(stats)}],
                    "usage": usage(stats)}  # fmt: skip

        async def sse() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[tuple[str, GenerationStats | None] | None] = asyncio.Queue()
            worker = loop.run_in_executor(None, generate, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
            try:
                while (item := await queue.get()) is not None:
                    piece, stats = item
                    if piece:
                        yield "data: " + json.dumps({**chunk, "choices": [choice(piece, None)]}) + "\n\n"
                    if stats is not None:
                        yield "data: " + json.dumps({**chunk, "choices": [choice("", finish(stats))]}) + "\n\n"
                        if (body.get("stream_options") or {}).get("include_usage"):
                            yield "data: " + json.dumps({**chunk, "choices": [], "usage": usage(stats)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when Starlette cancels the stream because the client went away
                cancel.set()
                await asyncio.shield(worker)

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


@contextmanager
def openai_peer(model: ChatModel, model_id: str = "tiny", api_key: str | None = None) -> Iterator[tuple[str, PeerRecord]]:
    """The server on an ephemeral loopback port: yields its base URL (with /v1) and what it recorded."""
    record = PeerRecord()
    with serving(_app(model, model_id, api_key, record), lifespan="off") as url:
        yield url, record


@contextmanager
def serving(app: FastAPI, lifespan: str = "on") -> Iterator[str]:
    """`app` under uvicorn on an ephemeral loopback port, in a thread: yields its base URL (with /v1)."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
