"""The engine-independent half of a reply: fitting the conversation, turning tokens into text, stop strings, cancel,
the stop reason and the timing. A backend brings only what its engine does: render and tokenize a conversation,
and a step (`TokenSteps`) that samples a token, says whether it ends the reply, spells it, and decodes it.
"""

from __future__ import annotations

import codecs
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from pocketlm.backends.base import (
    ChatMessage,
    ContextTrimmed,
    GenerationEvent,
    GenerationStats,
    Notice,
    SamplingParams,
    StopReason,
    TextPiece,
    require_token_count,
)
from pocketlm.backends.chat_template import RenderedPrompt
from pocketlm.backends.context_window import fit_conversation


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


class BytePieces:
    """Text from tokens spelled as bytes (llama.cpp): a character split over two tokens shows once both arrived."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._piece(token))

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


class WindowDecoder:
    """Text from a tokenizer that decodes token lists to text (transformers), not single tokens to bytes.

    A token alone can decode to a half character or lose the space a SentencePiece token begins with, so each step
    decodes a short window of recent tokens and shows what it adds to the window before it; text ending in U+FFFD
    waits for the next token to complete its character (the way text-generation-inference streams).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # tokens before this are shown

    def feed(self, token: int) -> str:
        self._tokens.append(token)
        shown = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return text[len(shown) :]

    def finish(self) -> str:
        shown = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return text[len(shown) :]


class Detokenizer(Protocol):
    """What `stream_reply` needs to turn tokens into text (BytePieces or WindowDecoder)."""

    def feed(self, token: int) -> str: ...

    def finish(self) -> str: ...


@dataclass(frozen=True)
class TokenSteps:
    """One reply's decoding on an engine whose cache already holds the prompt."""

    next_token: Callable[[], int]  # sample the next token from the latest logits
    is_end: Callable[[int], bool]  # an end-of-generation token
    advance: Callable[[int], None]  # feed the token back, so the next sample follows it
    text: Detokenizer
    prompt_evaluated: int  # the prompt tokens the engine computed for this reply (not reused from its cache)


@dataclass(frozen=True)
class ReplyEngine:
    """What a backend's model gives `stream_reply` and `stream_prompt`."""

    context_length: int
    render: Callable[[list[ChatMessage]], list[int]]  # the conversation's prompt tokens
    take_notice: Callable[[], str | None]  # a template replaced while rendering, once
    # Prefill the prompt and make the reply's steps; leaving the context frees what they hold (a sampler).
    start: Callable[[list[int], SamplingParams], AbstractContextManager[TokenSteps]]


def stream_reply(engine: ReplyEngine, messages: list[ChatMessage], sampling: SamplingParams, cancel: threading.Event) -> Iterator[GenerationEvent]:
    """The reply's events: ContextTrimmed or Notice first if any, TextPieces, then GenerationStats.

    time_to_first_token is from the call to the first sampled token (fitting and prefill included); generation_s from
    the first to the last token, so GenerationStats.tokens_per_second is decode speed only.
    """
    started = time.perf_counter()
    n_ctx = engine.context_length
    reply_reserve = min(sampling.max_tokens or n_ctx // 4, n_ctx // 2)
    kept, dropped, _ = fit_conversation(messages, lambda turns: len(engine.render(turns)), n_ctx - reply_reserve)
    prompt = engine.render(kept)
    if notice := engine.take_notice():  # the template failed on this conversation and was replaced
        yield Notice(notice)
    if dropped:
        yield ContextTrimmed(dropped_messages=dropped, prompt_tokens=len(prompt), context_length=n_ctx)
    yield from decode_reply(engine, prompt, sampling, cancel, started)


def stream_prompt(engine: ReplyEngine, prompt: Sequence[int], sampling: SamplingParams, cancel: threading.Event) -> Iterator[GenerationEvent]:
    """A reply continuing `prompt` as it is (no template, no fitting), down the same decode path as stream_reply:
    what ChatModel.stream_tokens measures. The caller makes the engine evaluate every prompt token."""
    started = time.perf_counter()
    require_token_count(prompt, engine.context_length, "stream_tokens", room=1)
    yield from decode_reply(engine, list(prompt), sampling, cancel, started)


def decode_reply(
    engine: ReplyEngine, prompt: list[int], sampling: SamplingParams, cancel: threading.Event, started: float
) -> Iterator[GenerationEvent]:
    """Prefill `prompt`, then sample, spell and feed back one token at a time until an end token, a stop string,
    max_tokens, the context's end or a cancel: TextPieces, then GenerationStats, with times counted from `started`.

    prefill_s is from entering engine.start to the first sampled token: the prompt's evaluation and the first sample,
    without the rendering or fitting before it.
    """
    room = engine.context_length - len(prompt)
    max_tokens = min(sampling.max_tokens or room, room)
    stop_reason: StopReason = "max_tokens" if sampling.max_tokens and sampling.max_tokens <= room else "context_full"
    stop_filter = StopStringFilter(sampling.stop)
    generated = 0
    first_token_at = last_token_at = 0.0
    prefill_started = time.perf_counter()
    prefill_s: float | None = None
    with engine.start(prompt, sampling) as steps:
        while True:
            if cancel.is_set():
                stop_reason = "cancelled"
                break
            token = steps.next_token()
            if prefill_s is None:
                prefill_s = time.perf_counter() - prefill_started
            if not sampling.ignore_eos and steps.is_end(token):
                stop_reason = "end_of_generation"
                break
            last_token_at = time.perf_counter()
            if not generated:
                first_token_at = last_token_at
            generated += 1
            text = stop_filter.feed(steps.text.feed(token))
            if text:
                yield TextPiece(text)
            if stop_filter.stopped:
                stop_reason = "stop_string"
                break
            if generated >= max_tokens:
                break
            if cancel.is_set():
                stop_reason = "cancelled"
                break
            steps.advance(token)
        if not stop_filter.stopped:
            tail = stop_filter.feed(steps.text.finish()) + stop_filter.flush()
            if tail:
                yield TextPiece(tail)
    yield GenerationStats(
        prompt_tokens=len(prompt),
        generated_tokens=generated,
        time_to_first_token_s=(first_token_at or time.perf_counter()) - started,
        generation_s=last_token_at - first_token_at,
        stop_reason=stop_reason,
        prompt_evaluated_tokens=steps.prompt_evaluated,
        prefill_s=prefill_s or 0.0,  # none sampled: cancelled before the first token
    )


@dataclass(frozen=True)
class PromptTokenizer:
    """Tokens of a rendered prompt in which only the template's own control tokens become control tokens.

    A tokenizer splits a text at control-token strings and tokenizes the runs between them on their own; so does this,
    at the template's control tokens only, the messages' text put back into the runs between them. A turn marker the
    tokenizer finds in any text (a user-defined token) is cut in two where a message holds it.
    """

    control_ids: dict[str, int]  # the control tokens and the template's turn markers, by their text
    marker_ids: frozenset[int]  # the turn markers' ids: tokens that must not come out of a message's text
    control_pattern: re.Pattern[str] | None
    tokenize_text: Callable[[str], list[int]]  # text as text: control-token strings in it are not parsed

    def tokens(self, prompt: RenderedPrompt) -> list[int]:
        tokens: list[int] = []
        for text, is_control in prompt.fragments(self.control_pattern):
            tokens += [self.control_ids[text]] if is_control else self.text_tokens(text)
        return tokens

    def text_tokens(self, text: str) -> list[int]:
        tokens = self.tokenize_text(text)
        pattern = self.control_pattern
        matches = list(pattern.finditer(text)) if pattern is not None and self.marker_ids.intersection(tokens) else []
        if len(text) < 2 or not matches:
            return tokens
        pieces: list[int] = []
        start = 0
        for match in matches:
            middle = (match.start() + match.end()) // 2
            pieces += self.text_tokens(text[start : match.start()])
            pieces += self.text_tokens(text[match.start() : middle]) + self.text_tokens(text[middle : match.end()])
            start = match.end()
        return pieces + self.text_tokens(text[start:])
