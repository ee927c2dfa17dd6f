"""The interactive chat of `pocketlm chat` in a terminal (the REPL), and the streaming of a reply to the terminal that
`chat` and `run` share. `/adapter` is app/repl_adapters.py's."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from pocketlm.app.history import Conversation, ConversationStore
    from pocketlm.app.model_loading import ModelChoice
    from pocketlm.backends.base import ChatModel, SamplingParams
    from pocketlm.models.store import ModelStore


def warning_markup(message: str) -> str:
    """A warning line in rich markup; the message (it may quote a path or a template) is escaped, shown as written."""
    from rich.markup import escape

    return f"[yellow]Warning:[/yellow] [dim]{escape(message)}[/dim]"


def stream_reply(history: ConversationStore, model: ChatModel, conversation_id: int, text: str,
                  sampling: SamplingParams, console: Console | None) -> None:  # fmt: skip
    """Print the reply as it streams; Ctrl-C stops it and keeps what was said. `console` None: the reply alone."""
    from rich.console import Console

    from pocketlm.app.chat_session import reply
    from pocketlm.backends.base import ContextTrimmed, GenerationStats, Notice, TextPiece

    cancel = threading.Event()
    events = reply(history, model, conversation_id, text, sampling, cancel)
    stats = None
    try:
        for event in events:
            if isinstance(event, TextPiece):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Notice):  # on stderr even in pipe mode: stdout holds the reply alone
                (console or Console(stderr=True)).print(warning_markup(event.message), soft_wrap=True)
            elif isinstance(event, ContextTrimmed) and console:
                console.print(f"[dim](dropped the {event.dropped_messages} oldest messages to fit the {event.context_length}-token context)[/dim]")
            elif isinstance(event, GenerationStats):
                stats = event
    except KeyboardInterrupt:
        if console is None:
            raise
        cancel.set()
        for event in events:  # the stream ends within a token and stores the partial reply
            if isinstance(event, GenerationStats):
                stats = event
    sys.stdout.write("\n")
    sys.stdout.flush()
    if console and stats:
        note = "  [yellow]stopped[/yellow]" if stats.stop_reason == "cancelled" else ""
        console.print(
            f"[dim]{stats.generated_tokens} tokens · {stats.tokens_per_second:.1f} tokens/s · "
            f"{stats.time_to_first_token_s:.2f} s to first token{note}[/dim]"
        )


REPL_HELP = """Type a message and press Enter. Wrap several lines in \"\"\" to send them as one message.
  /new                  start a new conversation (the adapters stay attached)
  /system TEXT          set the system prompt (starts a new conversation)
  /adapter NAME [SCALE] attach a LoRA adapter at SCALE (default 1), or rescale an attached one
  /adapter off [NAME]   detach NAME, or every adapter
  /adapter              list the attached adapters
  /bye                  quit (Ctrl-D also quits; Ctrl-C stops a reply)"""


def read_message() -> str | None:
    """One message from the prompt; None at end of input."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    if not line.startswith('"""'):
        return line
    lines = [line[3:]]
    while not lines[-1].endswith('"""'):
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines).removesuffix('"""').strip()


def repl(model: ChatModel, history: ConversationStore, store: ModelStore, choice: ModelChoice, conversation: Conversation,
         system: str, sampling: SamplingParams, console: Console) -> None:  # fmt: skip
    """Read messages and commands until /bye or end of input, answering each; the model is closed at the end."""
    import readline  # noqa: F401  (line editing and history for input())

    from rich.markup import escape

    from pocketlm.app.repl_adapters import adapters_line, run_adapter_command
    from pocketlm.models.errors import PocketError

    description = model.description
    # Names and messages are escaped: rich parses a printed str as markup, and `evil[/]name` would raise.
    where = description.backend + (f" ({description.device})" if description.device else "")
    console.print(f"[bold]{escape(description.name)}[/bold] on {escape(where)} · {description.context_length} tokens of context. /? for help.")
    if description.adapters:
        console.print(adapters_line(model))
    try:
        while (text := read_message()) is not None:
            if not text.strip():
                continue
            command, _, argument = text.strip().partition(" ")
            if command in ("/bye", "/exit", "/quit"):
                break
            if command in ("/?", "/help"):
                console.print(REPL_HELP)
            elif command == "/adapter":
                run_adapter_command(argument, model, store, choice, console)  # a failure is a line; the session goes on
            elif command in ("/new", "/system"):
                system = argument if command == "/system" else system
                conversation = history.create(model=description.name, system_prompt=system, sampling=sampling)
                console.print("[dim]New conversation.[/dim]")
            else:
                try:
                    stream_reply(history, model, conversation.id, text, sampling, console)
                except PocketError as error:  # one failed turn (too long, refused by the template) ends no session
                    console.print(f"[red]Error:[/red] {escape(error.message)} {escape(error.hint)}")
    finally:
        model.close()
