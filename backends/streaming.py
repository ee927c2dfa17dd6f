"""Pieces every streaming backend needs: holding back text that may be the start of a stop string."""

from __future__ import annotations


class StopStringFilter:
    """Feeds decoded text through; withholds a tail that could still become a stop string, and cuts at one."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to show now. After a stop string appears, sets `stopped` and returns what preceded it."""
        if not self._stop:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            emitted, self._pending = self._pending[:cut], ""
            return emitted
        hold = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        emitted = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(emitted) :]
        return emitted

    def flush(self) -> str:
        """What was withheld, once the stream ends without a stop string."""
        emitted, self._pending = self._pending, ""
        return emitted
