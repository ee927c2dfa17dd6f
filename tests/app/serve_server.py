"""`pocketlm serve`'s app on uvicorn, on an ephemeral loopback port in a thread, for tests that talk to it over HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import openai
import uvicorn
from fastapi import FastAPI

from pocketlm.app.serve_app import create_app
from pocketlm.app.serve_settings import ServeSettings
from pocketlm.models.store import ModelStore


@dataclass(frozen=True)
class RunningServer:
    app: FastAPI
    base_url: str  # http://127.0.0.1:PORT/v1

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        """The official client on this server, without its retries (a test must see the first answer)."""
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)


@contextmanager
def running_server(store: ModelStore, settings: ServeSettings) -> Iterator[RunningServer]:
    app = create_app(store, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # the lifespan loads the models named at start first
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(app, f"http://127.0.0.1:{port}/v1")
    finally:
        server.should_exit = True
        thread.join(60)
