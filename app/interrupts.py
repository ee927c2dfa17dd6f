"""Ctrl-C in long CLI work: it sets the work's cancel event instead of raising KeyboardInterrupt wherever the main
thread happens to be."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def ctrl_c_sets(cancel: threading.Event) -> Iterator[None]:
    """Ctrl-C sets `cancel` rather than raising KeyboardInterrupt; a second Ctrl-C raises it, for a user who won't wait.

    KeyboardInterrupt is raised wherever the main thread happens to be. Landing in a lazy import's module-lock
    bookkeeping, it is either swallowed ("Exception ignored in ... _get_module_lock ... cb": the work carries on as if
    no key was pressed) or leaves the import lock held (the next import waits for ever); in a library's lock
    `__enter__` it can leave that lock held. A handler that only sets an event lands nowhere harmful: the work sees
    the event (a transfer's watcher shuts its socket at once; a converter looks between tensors) and unwinds like any
    cancel, its files closed: a download resumable, a conversion leaving nothing.
    """

    def on_ctrl_c(signum: int, frame: object) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def in_worker(work: Callable[[], T], cancel: threading.Event, abandon_with: Exception | None = None) -> T:
    """`work()` run in a thread while the main thread only waits, so a Ctrl-C is seen within 0.1 s even if the signal
    reached another thread and the work is blocked in a socket read; its exception is re-raised here. With
    `abandon_with`, a cancel raises that at once and leaves the work (which must write nothing) to end on its own."""
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as error:  # noqa: BLE001 - handed to the main thread as is
            outcome.append((False, error))

    worker = threading.Thread(target=run, name="pocketlm-work", daemon=True)  # daemon: a second Ctrl-C must not wait for it
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
        if abandon_with is not None and cancel.is_set():
            raise abandon_with
    succeeded, value = outcome[0]
    if not succeeded:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
