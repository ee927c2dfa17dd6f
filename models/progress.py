"""One progress type for every long job (fetch, download, convert, bench); the CLI and the app each render it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressUpdate:
    description: str
    completed: int = 0
    total: int | None = None  # None while the size is unknown: render as indeterminate


ProgressCallback = Callable[[ProgressUpdate], None]


def ignore_progress(update: ProgressUpdate) -> None:
    """The callback for callers that show no progress."""
