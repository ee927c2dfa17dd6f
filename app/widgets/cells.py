"""Table cells that show the user's strings as written."""

from __future__ import annotations

from rich.text import Text


def cell(value: str) -> Text:
    """A table cell showing `value` as written: a str cell is parsed as markup, and a name like `evil[/]name` would raise
    MarkupError from the table's rendering and end the app. Laid out as DataTable lays out a one-line str cell."""
    return Text(value, no_wrap=True, end="")
