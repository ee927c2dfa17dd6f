"""Perplexity of a loaded model on a text, through its backend's log_likelihood: the same figure on every engine."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pocketlm.backends.base import ChatModel
from pocketlm.models.errors import Cancelled, PocketError


@dataclass(frozen=True)
class Perplexity:
    value: float
    scored_tokens: int
    windows: int


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go to the model; the last `scored` of them are scored (the others are context only)."""

    begin: int
    end: int
    scored: int


def sliding_windows(token_count: int, window: int) -> list[Window]:
    """Strided windows over `token_count` tokens, as transformers' perplexity guide strides them: each window starts
    window // 2 after the previous one and scores only the tokens the previous did not, so every token but the first
    (which nothing predicts) is scored exactly once and, past the first window, with at least window // 2 before it."""
    if window < 2:
        raise ValueError("a window holds at least two tokens")
    stride = window // 2
    windows: list[Window] = []
    scored_up_to = 0
    for begin in range(0, token_count, stride):
        end = min(begin + window, token_count)
        # The first window cannot score its first token: nothing comes before it.
        windows.append(Window(begin, end, end - max(scored_up_to, begin + 1)))
        scored_up_to = end
        if end == token_count:
            break
    return windows


def perplexity(
    model: ChatModel,
    text: str,
    window: int = 512,
    cancel: threading.Event | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """exp of the mean negative log-likelihood of `text`'s tokens (model.tokenize: its BOS first where it adds one),
    scored in sliding windows of `window` tokens (capped at the loaded context); on_step(done, total) per window;
    cancelling raises Cancelled."""
    tokens = model.tokenize(text)
    if len(tokens) < 2:
        raise PocketError(f"The text is {len(tokens)} token long: perplexity needs at least two.", "Give a longer text.")
    window = max(2, min(window, model.description.context_length))
    spans = sliding_windows(len(tokens), window)
    total_log_likelihood = 0.0
    scored = 0
    for done, span in enumerate(spans, start=1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("The perplexity measurement was cancelled.", "Run it again to measure.")
        # log_likelihood gives one value per token after the window's first: the last `span.scored` are new here.
        values = model.log_likelihood(tokens[span.begin : span.end])[-span.scored :]
        total_log_likelihood += float(values.sum())
        scored += span.scored
        if on_step is not None:
            on_step(done, len(spans))
    return Perplexity(exp_or_infinity(-total_log_likelihood / scored), scored, len(spans))


def exp_or_infinity(mean_negative_log_likelihood: float) -> float:
    """The perplexity for a mean negative log-likelihood; a model broken enough to overflow float gets infinity."""
    try:
        return math.exp(mean_negative_log_likelihood)
    except OverflowError:
        return math.inf
