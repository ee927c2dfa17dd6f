"""What a chat model on a Hugging Face tokenizer does the same on every engine (torch, mlx): count and render prompts
with its HFChatTokens, and stream one reply at a time through its ReplyEngine, refusing once closed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from pocketlm.backends.base import ChatMessage, GenerationEvent, ModelDescription, SamplingParams
from pocketlm.backends.hf_tokenizer import HFChatTokens
from pocketlm.backends.streaming import ReplyEngine, stream_reply
from pocketlm.models.errors import PocketError


class HFTokenizerChat:
    """A base for the engines' chat models, which set these attributes in their __init__ (and `_model` to None on close)."""

    description: ModelDescription
    _tokens: HFChatTokens
    _engine: ReplyEngine
    _lock: threading.Lock
    _model: Any

    def _render(self, messages: list[ChatMessage]) -> list[int]:
        return self._tokens.render(messages)

    def prompt_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self._render(messages))

    def count_tokens(self, text: str) -> int:
        return len(self._tokens.tokenize_text(text))

    def stream_chat(
        self, messages: list[ChatMessage], sampling: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        with self._lock:
            if self._model is None:
                raise PocketError(f"{self.description.name} was closed, so it cannot reply any more.", "Load the model again.")
            yield from stream_reply(self._engine, messages, sampling, cancel or threading.Event())
