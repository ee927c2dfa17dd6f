"""Renders ProgressUpdate events as a rich progress bar on the terminal (the app has its own widget)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)  # fmt: skip

from pocketlm.models.progress import ProgressCallback, ProgressUpdate


@contextmanager
def rich_progress(console: Console, unit: str = "bytes") -> Iterator[ProgressCallback]:
    """Bytes (downloads: size, speed, time left) or items (tensors converted: n of m, time so far and left)."""
    # markup=False: descriptions name models and files, which must show as written (`a[/]b` would raise).
    description = TextColumn("{task.description}", markup=False)
    if unit == "bytes":
        columns = (SpinnerColumn(), description, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    else:
        columns = (SpinnerColumn(), description, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def show(update: ProgressUpdate) -> None:
            if update.description not in tasks:
                tasks[update.description] = progress.add_task(update.description, total=update.total)
            progress.update(tasks[update.description], completed=update.completed, total=update.total)

        yield show
