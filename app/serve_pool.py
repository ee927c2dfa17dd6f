"""The models `pocketlm serve` answers with: loaded on first use through app.model_loading, one generation at a time
per model with a bounded queue of waiting requests in front of it, closed again after --idle-unload seconds unused.

A request takes the model's turn (ModelPool.acquire) and hands it back (ServedModel.release) from whichever thread
ends its generation: the turn is held until the engine has really stopped, so a cancelled reply's last token can
never run beside the next request's first.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio.to_thread

from pocketlm.app.model_loading import ModelChoice, choose_model, load_model
from pocketlm.app.serve_errors import ModelUnavailable, QueueFull, QueueTimeout, UnknownModel
from pocketlm.app.serve_settings import ServeSettings
from pocketlm.backends.base import ChatModel, LoadOptions
from pocketlm.models.errors import ModelNotFound, PocketError
from pocketlm.models.store import ModelStore


@dataclass(frozen=True)
class ModelEntry:
    name: str
    created: int


class ServedModel:
    """One model of the pool: its choice, the loaded ChatModel (None while unloaded) and its turn."""

    def __init__(self, choice: ModelChoice, options: LoadOptions) -> None:
        self.choice = choice
        self._options = options
        self._model: ChatModel | None = None
        self._turn = asyncio.Semaphore(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.waiting = 0
        self.last_used = time.monotonic()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def busy(self) -> bool:
        return self._turn.locked()

    async def take_turn(self, max_queue: int, timeout_s: float) -> None:
        """Wait for the model's turn: 429 when max_queue requests already wait, 503 after timeout_s."""
        self._loop = asyncio.get_running_loop()
        if self._turn.locked() and self.waiting >= max_queue:
            raise QueueFull(f"{self.choice.name} is busy and {self.waiting} requests already wait for it.",
                            "Retry in a moment.", code="queue_full")  # fmt: skip
        self.waiting += 1
        try:
            await asyncio.wait_for(self._turn.acquire(), timeout_s)
        except TimeoutError:
            raise QueueTimeout(f"{self.choice.name} stayed busy for {timeout_s:g} s while this request waited.",
                               "Retry later, or start the server with a longer queue timeout.", code="queue_timeout") from None  # fmt: skip
        finally:
            self.waiting -= 1

    def release(self) -> None:
        """Hand the turn on; callable from any thread (a generation's worker ends there)."""
        self.last_used = time.monotonic()
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed: the server is shutting down
            loop.call_soon_threadsafe(self._turn.release)

    def model(self) -> ChatModel:
        """The loaded model, loading it first if needed (blocking: call it from a worker thread, holding the turn)."""
        if self._model is None:
            try:
                self._model = load_model(self.choice, self._options)
            except PocketError as error:
                raise ModelUnavailable(f"{self.choice.name} could not be loaded: {error.message}", error.hint,
                                       code="model_unavailable") from error  # fmt: skip
        self.last_used = time.monotonic()
        return self._model

    def unload(self) -> None:
        """Close the model (blocking; holding the turn), so its memory is free until the next request loads it."""
        model, self._model = self._model, None
        if model is not None:
            model.close()


class ModelPool:
    def __init__(self, store: ModelStore, settings: ServeSettings) -> None:
        self._store = store
        self._settings = settings
        self._options = LoadOptions(context_length=settings.context_length, threads=settings.threads)
        self._served: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> ModelStore:
        return self._store

    def entries(self) -> list[ModelEntry]:
        """What /v1/models lists: the store's models (adapters are not models to chat with) and those named at start."""
        created = {m.name: int(m.added_at) for m in self._store.list() if not m.is_adapter}
        with self._lock:
            for name in self._served:
                created.setdefault(name, 0)
        return [ModelEntry(name, when) for name, when in sorted(created.items())]

    def add(self, query: str) -> ServedModel:
        """A model named on the command line: a store name, a prefix, or a path (the user's own machine, so a path is
        fine here; a request may only name what this pool or the store already knows)."""
        choice = choose_model(self._store, query)
        return self._served_for(choice)

    def resolve(self, query: str) -> ServedModel:
        with self._lock:
            served = self._served.get(query)
        if served is not None:
            return served
        try:
            model = self._store.resolve(query)
        except ModelNotFound as error:
            raise UnknownModel(error.message, "GET /v1/models lists the models this server has.", code="model_not_found", param="model") from None
        if model.is_adapter:
            raise UnknownModel(f"{model.name} is a LoRA adapter, not a model.", "Name a model from GET /v1/models.",
                               code="model_not_found", param="model")  # fmt: skip
        return self._served_for(ModelChoice(model.name, model.path, model.format))

    def _served_for(self, choice: ModelChoice) -> ServedModel:
        with self._lock:
            return self._served.setdefault(choice.name, ServedModel(choice, self._options))

    async def acquire(self, query: str) -> tuple[ServedModel, ChatModel]:
        """The model's turn and the loaded model; the caller must call served.release() once its generation ends."""
        served = self.resolve(query)
        await served.take_turn(self._settings.max_queue, self._settings.queue_timeout_s)
        try:
            model = await anyio.to_thread.run_sync(served.model)
        except BaseException:
            served.release()
            raise
        return served, model

    async def preload(self, queries: Sequence[str]) -> None:
        for query in queries:
            served = self.add(query)
            await self.acquire(served.choice.name)
            served.release()

    def load_now(self, queries: Sequence[str]) -> None:
        """Load the models named at start before the server runs, so that a name that matches nothing or a model that
        does not fit is the command's error sentence, not a failed server start (preload then finds them loaded)."""
        for query in queries:
            self.add(query).model()

    async def unload_idle(self) -> list[str]:
        """Close every model unused for idle_unload_s and not busy; their names."""
        now = time.monotonic()
        with self._lock:
            candidates = [s for s in self._served.values() if s.loaded and not s.busy and now - s.last_used >= self._settings.idle_unload_s]
        closed = []
        for served in candidates:
            if served.busy:
                continue
            await served.take_turn(0, 0.1)
            try:
                await anyio.to_thread.run_sync(served.unload)
                closed.append(served.choice.name)
            finally:
                served.release()
        return closed

    async def reap_forever(self) -> None:
        """Unload idle models until cancelled (the server's lifespan runs it)."""
        period = max(0.5, min(self._settings.idle_unload_s / 4, 30.0))
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(QueueFull, QueueTimeout):
                await self.unload_idle()

    def close(self) -> None:
        with self._lock:
            served = list(self._served.values())
        for model in served:
            model.unload()

    def loaded_names(self) -> list[str]:
        with self._lock:
            return sorted(name for name, served in self._served.items() if served.loaded)
