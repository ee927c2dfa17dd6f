"""`pocketlm serve` inside the app: the same FastAPI app on uvicorn, in a thread of the app's process, on the app's own
store, bound to loopback only (the app has no place to ask for an API key, and a server nobody sees starting must not
be reachable from the network). A `pocketlm serve` in another process is invisible to the app; this one it can show.

fastapi and uvicorn are imported on start only: the app must open without them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from pocketlm.app.serve_settings import ServeSettings
from pocketlm.models.errors import PocketError
from pocketlm.models.store import ModelStore

LOOPBACK = "127.0.0.1"
_START_TIMEOUT_S = 30.0  # no model loads at start: only the socket and the lifespan
_GRACE_S = 5  # a stop waits this long for streaming replies to end, then closes their connections


class BackgroundServer:
    """One running server: its address, and how many requests it has answered."""

    def __init__(self, store: ModelStore, settings: ServeSettings) -> None:
        try:
            import uvicorn

            from pocketlm.app.serve_app import create_app
        except ImportError as missing:
            raise PocketError(f"Serving needs {missing.name}, which is not installed.", 'Run `pip install "pocketlm[serve]"`.') from None
        from pocketlm.app.cli_serve import _require_free_port

        settings = replace(settings, host=LOOPBACK, api_key=None, models=())
        if settings.port:
            _require_free_port(LOOPBACK, settings.port)  # a sentence, rather than uvicorn logging into the terminal UI
        self.app = create_app(store, settings)
        config = uvicorn.Config(self.app, host=LOOPBACK, port=settings.port, log_level="critical", lifespan="on",
                                timeout_graceful_shutdown=_GRACE_S)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="pocketlm-serve", daemon=True)
        self.port = settings.port

    def start(self) -> BackgroundServer:
        """Start listening; returns once the socket is bound (the port is then the real one, even for port 0)."""
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise PocketError(f"The server could not start on {LOOPBACK}:{self.port}.", "Another program may use the port; quit it and try again.")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def requests_answered(self) -> int:
        return int(self.app.state.requests.total)

    def stop(self, wait_s: float = _GRACE_S + 5) -> None:
        """Stop listening, give streaming replies the grace period, unload the models (the lifespan's end)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(wait_s)

    def describe(self) -> str:
        count = self.requests_answered
        return f"Serving on {self.url} — {count} request{'' if count == 1 else 's'}"
