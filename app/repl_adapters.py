"""`/adapter` in the interactive chat: attach, rescale, detach and list LoRA adapters on the live model.

A first attach may convert a PEFT adapter for the backend (seconds to minutes): it runs in a worker with a cancel event
that Ctrl-C sets (app/interrupts.py), so Ctrl-C stops the conversion and leaves nothing written, not the session. Any
failure is one line, and the model keeps the adapters it had.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pocketlm.app.interrupts import ctrl_c_sets, in_worker

if TYPE_CHECKING:
    from rich.console import Console

    from pocketlm.app.model_loading import ModelChoice
    from pocketlm.backends.base import AdapterSpec, ChatModel
    from pocketlm.models.store import ModelStore


def adapters_line(model: ChatModel) -> str:
    """The active adapters, as the REPL shows them after each change (rich markup; the names escaped)."""
    from rich.markup import escape

    from pocketlm.app.history import adapters_label, used_adapters

    active = model.description.adapters
    if not active:
        return "[dim]No adapters attached.[/dim]"
    return "[dim]Adapters:[/dim] " + escape(adapters_label(used_adapters(active)))


def run_adapter_command(argument: str, model: ChatModel, store: ModelStore, choice: ModelChoice, console: Console) -> None:
    """adapter_command, whose every failure is one line on `console`: the session goes on, the adapters unchanged."""
    from rich.markup import escape

    from pocketlm.models.errors import PocketError

    try:
        adapter_command(argument, model, store, choice, console)
    except PocketError as error:
        console.print(f"[red]Error:[/red] {escape(error.message)} {escape(error.hint)}")
    except KeyboardInterrupt:  # a second Ctrl-C, for a user who won't wait for the conversion to stop
        console.print("[yellow]Stopped.[/yellow] The adapters are as they were.")
    except Exception as error:  # noqa: BLE001 - as the CLI's last net: a sentence naming it, never the session's end
        console.print(f"[red]Error:[/red] /adapter failed unexpectedly: {escape(type(error).__name__)}: {escape(str(error))}. "
                      "This is a bug in pocketlm; please report it. The adapters are as they were.")  # fmt: skip


def adapter_command(argument: str, model: ChatModel, store: ModelStore, choice: ModelChoice, console: Console) -> None:
    """`/adapter NAME [SCALE]` attaches or rescales, `/adapter off [NAME]` detaches, `/adapter` lists; then the set is shown."""
    from pocketlm.app.adapter_loading import checked_scale, find_adapter
    from pocketlm.models.errors import PocketError

    words = argument.split()
    active = list(model.description.adapters)
    if not words:
        console.print(adapters_line(model))
        return
    if words[0] == "off" and len(words) <= 2:
        attached = {spec.label for spec in active}
        if len(words) == 2:
            gone = words[1] if words[1] in attached else find_adapter(store, words[1]).name  # a prefix names it too
            if gone not in attached:
                raise PocketError(f"{gone} is not attached.", "`/adapter` lists the attached ones.")
            active = [spec for spec in active if spec.label != gone]
        else:
            active = []
    elif len(words) <= 2:
        try:
            scale = checked_scale(float(words[1])) if len(words) == 2 else 1.0
        except ValueError:
            raise PocketError(f"{words[1]!r} is not a scale.", "Write /adapter NAME 0.5 (1 is the adapter as trained, 0 turns it off).") from None
        spec = _prepare(words[0], scale, model, store, choice, console)
        # A rescale keeps the adapter's place in the stack; a new one goes on top.
        replaced = [spec if old.label == spec.label else old for old in active]
        active = replaced if any(old.label == spec.label for old in active) else [*active, spec]
    else:
        raise PocketError("/adapter takes a name and a scale at most.", "Write /adapter NAME [SCALE], /adapter off [NAME], or /adapter alone.")
    model.set_adapters(active)
    console.print(adapters_line(model))


def _prepare(query: str, scale: float, model: ChatModel, store: ModelStore, choice: ModelChoice, console: Console) -> AdapterSpec:
    """The adapter in the backend's format, converted in a worker if need be; Ctrl-C stops the conversion."""
    from rich.text import Text

    from pocketlm.app.adapter_loading import adapter_spec_for
    from pocketlm.models.errors import Cancelled

    cancel = threading.Event()
    try:
        with ctrl_c_sets(cancel), console.status(Text(f"Preparing {query}… (Ctrl-C stops)")):
            return in_worker(lambda: adapter_spec_for(store, query, scale, model.description.backend, choice, cancel=cancel), cancel)
    except Cancelled:
        raise Cancelled(f"Preparing {query} stopped; nothing was written and the adapters are as they were.") from None
