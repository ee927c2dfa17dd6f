"""One generation of `pocketlm serve`, run in its own thread and read from the event loop.

The engine's stream blocks, so a worker thread drives it and posts each event to an asyncio queue; the request reads
them without blocking other requests. Cancelling sets the stream's cancel event (the engine stops within one token);
the worker hands the model's turn back only once the stream has really ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from pocketlm.backends.base import GenerationEvent, GenerationStats

StreamFactory = Callable[[threading.Event], Iterator[GenerationEvent]]


@dataclass(frozen=True)
class _Ended:
    error: BaseException | None


class Generation:
    def __init__(self, stream: StreamFactory, on_end: Callable[[Generation], None]) -> None:
        self._stream = stream
        self._on_end = on_end
        self._cancel = threading.Event()
        self._queue: asyncio.Queue[GenerationEvent | _Ended] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.stats: GenerationStats | None = None  # the engine's figures once it ended, cancelled or not
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pocketlm-serve-generation", daemon=True)

    def start(self) -> Generation:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def _post(self, item: GenerationEvent | _Ended) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us: the server is stopping
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            for event in self._stream(self._cancel):
                if isinstance(event, GenerationStats):
                    self.stats = event
                self._post(event)
        except BaseException as caught:  # noqa: BLE001 - handed to the request, which answers it
            error = self.error = caught
        finally:
            self._on_end(self)
            self._post(_Ended(error))

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """The stream's events; re-raises what the stream raised. Leaving early (a disconnect) cancels the stream."""
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Ended):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            self._cancel.set()
