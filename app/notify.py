"""Errors as the app shows them: one notification saying what is wrong and, below it, what to do."""

from __future__ import annotations

from textual.dom import DOMNode

from pocketlm.models.errors import Cancelled, PocketError


def unexpected(action: str, error: BaseException) -> PocketError:
    """A surprise from a worker (a bug, an engine's own exception) as a sentence, so it is shown, never a traceback."""
    detail = str(error).rstrip(".") or "no details"
    return PocketError(f"{action} failed unexpectedly: {type(error).__name__}: {detail}.", "This is a bug in pocketlm; please report it.")


def as_pocket_error(action: str, error: BaseException) -> PocketError:
    return error if isinstance(error, PocketError) else unexpected(action, error)


def notify_error(node: DOMNode, error: BaseException, title: str = "", timeout: float = 15) -> None:
    """Show `error` on `node`'s app: its sentence, then its hint on a line of its own. A Cancelled is a warning (the
    user asked for it); anything else is an error. markup=False: messages name models and files, which are the
    user's (`evil[/]name` would raise MarkupError from the toast's rendering and end the app)."""
    pocket = as_pocket_error(title or "The job", error)
    text = f"{pocket.message}\n{pocket.hint}" if pocket.hint else pocket.message
    severity = "warning" if isinstance(pocket, Cancelled) else "error"
    node.notify(text, title=title, severity=severity, timeout=timeout, markup=False)
