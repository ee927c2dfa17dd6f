"""What a chat model on a Hugging Face tokenizer does the same on every engine (torch, mlx): count, tokenize and render
prompts with its HFChatTokens, stream one reply at a time through its ReplyEngine, and score tokens from its
token_logits, refusing once closed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pocketlm.backends.base import ChatMessage, GenerationEvent, ModelDescription, SamplingParams, require_token_count
from pocketlm.backends.hf_tokenizer import HFChatTokens
from pocketlm.backends.streaming import ReplyEngine, stream_prompt, stream_reply
from pocketlm.models.errors import PocketError

if TYPE_CHECKING:
    import numpy as np


class HFTokenizerChat:
    """A base for the engines' chat models, which set these attributes in their __init__ (and `_model` to None on
    close), and define token_logits."""

    description: ModelDescription
    _tokens: HFChatTokens
    _engine: ReplyEngine
    _lock: threading.Lock
    _model: Any
    token_logits: Callable[[Sequence[int]], np.ndarray]  # the engine's own method

    def _render(self, messages: list[ChatMessage]) -> list[int]:
        return self._tokens.render(messages)

    def prompt_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self._render(messages))

    def chat_prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        return self._render(messages)

    def count_tokens(self, text: str) -> int:
        return len(self._tokens.tokenize_text(text))

    def tokenize(self, text: str) -> list[int]:
        return self._tokens.tokenize(text)

    def stream_chat(
        self, messages: list[ChatMessage], sampling: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        with self._lock:
            self._require_replying()
            yield from stream_reply(self._engine, messages, sampling, cancel or threading.Event())

    def stream_tokens(
        self, prompt: Sequence[int], sampling: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        """See ChatModel.stream_tokens: every reply prefills a fresh cache, so every prompt token is evaluated."""
        with self._lock:
            self._require_replying()
            yield from stream_prompt(self._engine, prompt, sampling, cancel or threading.Event())

    def log_likelihood(self, tokens: Sequence[int]) -> np.ndarray:
        """See ChatModel.log_likelihood: the logits after all tokens but the last, scored against the next token."""
        from pocketlm.backends.scoring import token_log_probabilities

        require_token_count(tokens, self.description.context_length, "log_likelihood", fewest=2)
        return token_log_probabilities(self.token_logits(tokens[:-1]), tokens[1:])

    def _require_replying(self) -> None:
        if self._model is None:
            raise PocketError(f"{self.description.name} was closed, so it cannot reply any more.", "Load the model again.")
