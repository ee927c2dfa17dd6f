"""How a worker thread reports progress to a widget: a ProgressCallback that posts ProgressMessage, coalesced.

A download reports every chunk and a converter every tensor: a message each would keep the event loop (and a core
the engine needs) busy redrawing. The relay posts at most one message per `interval`, always carrying the newest
update, and a burst's last update is posted after the interval even if no other follows (a stalled download still
shows the bytes it got). post_message is thread-safe and never blocks, so posting under the relay's lock waits for
nothing.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable

from textual.message_pump import MessagePump

from pocketlm.app.messages import JobFinished, ProgressMessage
from pocketlm.models.errors import PocketError
from pocketlm.models.progress import ProgressUpdate

_job_ids = itertools.count(1)


def new_job_id() -> int:
    """A number no other job of this app has had, so a message from a finished job is recognised as stale."""
    return next(_job_ids)


class ProgressRelay:
    """A ProgressCallback for one job, posting to `target` at most once per `interval` of `clock` (seconds).

    Every post happens under one lock, and finish() marks the relay finished under it: a timer that fires late finds
    the job over and posts nothing, so JobFinished is always the last message and the final update comes just before
    it. A post is due only once `clock` has moved `interval` past the previous one (a timer that wakes early waits
    again), so the number of messages depends on the clock alone, which a test may drive.
    """

    def __init__(self, target: MessagePump, job: int, interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.job = job
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: ProgressUpdate | None = None
        self._timer: threading.Timer | None = None
        self._last_post = -math.inf
        self._finished = False

    def __call__(self, update: ProgressUpdate) -> None:
        with self._lock:
            if self._finished:
                return  # a late update after the job's end would show a finished job as running
            self._pending = update
            if self._timer is None:  # else a post is due already: it will carry this update, the newest
                self._post_or_wait_locked()

    def _post_or_wait_locked(self) -> None:
        """Post the pending update if a post is due, else have a timer come back when it is."""
        wait = self._last_post + self.interval - self._clock()
        if wait > 0:
            self._timer = threading.Timer(wait, self._timer_fired)
            self._timer.daemon = True  # quitting the app never waits for a progress message
            self._timer.start()
            return
        self._post_pending_locked()

    def _timer_fired(self) -> None:
        with self._lock:
            if self._finished or self._timer is None:
                return
            self._timer = None
            self._post_or_wait_locked()

    def _post_pending_locked(self) -> None:
        update, self._pending = self._pending, None
        self._last_post = self._clock()
        if update is not None:
            self.target.post_message(ProgressMessage(self.job, update))  # thread-safe; queued in call order

    def finish(self, result: object | None = None, error: PocketError | None = None) -> None:
        """Post the last update held back, then the job's end: the widget sees every phase's final state in order."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._post_pending_locked()
            self.target.post_message(JobFinished(self.job, result, error))
