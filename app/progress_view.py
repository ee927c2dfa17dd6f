"""Renders ProgressUpdate events as a rich progress bar on the terminal (the app has its own widget)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from pocketlm.models.progress import ProgressCallback, ProgressUpdate


@contextmanager
def rich_progress(console: Console) -> Iterator[ProgressCallback]:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def show(update: ProgressUpdate) -> None:
            if update.description not in tasks:
                tasks[update.description] = progress.add_task(update.description, total=update.total)
            progress.update(tasks[update.description], completed=update.completed, total=update.total)

        yield show
