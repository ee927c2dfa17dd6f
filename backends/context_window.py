"""Fitting a conversation into a context window by dropping its oldest turns, as chat apps do."""

from __future__ import annotations

from collections.abc import Callable

from pocketlm.backends.base import ChatMessage
from pocketlm.models.errors import ContextOverflow


def fit_conversation(
    messages: list[ChatMessage], count_prompt_tokens: Callable[[list[ChatMessage]], int], budget: int
) -> tuple[list[ChatMessage], int, int]:
    """Drop the oldest turns after the system prompt until the prompt fits `budget` tokens.

    Returns the kept messages, how many were dropped, and the kept prompt's token count. The latest user
    message is never dropped; if it alone (with the system prompt) does not fit, that is an error.
    """
    system = [m for m in messages[:1] if m.role == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while True:
        kept = system + turns
        tokens = count_prompt_tokens(kept)
        if tokens <= budget:
            return kept, dropped, tokens
        if len(turns) <= 1:
            raise ContextOverflow(
                f"The message and system prompt take {tokens} tokens, more than the {budget} this context leaves for them.",
                "Shorten the message, or load the model with a larger context (--ctx).",
            )
        # Drop through the next user turn so the kept conversation still begins with the user speaking.
        turns = turns[1:]
        dropped += 1
        while len(turns) > 1 and turns[0].role != "user":
            turns = turns[1:]
            dropped += 1
