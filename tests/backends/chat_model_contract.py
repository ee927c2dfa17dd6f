"""What every ChatModel must do, whatever its engine: a class of tests each backend's test file subclasses with a
`chat_model` fixture (a tiny random model on that engine), a `load_with_context` fixture (loads that tiny model
with a given context length) and a `tokenizer_facts` fixture (what the model's own files say about its tokens), so a
new backend is held to the same stream."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pocketlm.backends.base import ChatMessage, ChatModel, ContextTrimmed, GenerationEvent, GenerationStats, SamplingParams, TextPiece
from pocketlm.models.errors import PocketError

HELLO = [ChatMessage("user", "Hello there, tell me something.")]
DOCUMENT = "The quick brown fox jumps over the lazy dog, then rests in the shade of an old oak tree."


@dataclass(frozen=True)
class TokenizerFacts:
    """What a model's own files (GGUF metadata, tokenizer_config.json) say, read without the backend under test."""

    bos_id: int
    adds_bos: bool  # a document's tokens begin with the BOS
    control_text: str  # a control token's text (an end token), which a document's text must not turn into
    control_id: int


def transformers_tokenizer_facts(folder: Path) -> TokenizerFacts:
    """TokenizerFacts of a checkpoint folder, as transformers itself reads its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    adds_bos = tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    return TokenizerFacts(tokenizer.bos_token_id, adds_bos, tokenizer.eos_token, tokenizer.eos_token_id)


def reply(events: list[GenerationEvent]) -> tuple[str, GenerationStats]:
    assert isinstance(events[-1], GenerationStats), "the stream must end with its stats"
    assert not any(isinstance(event, GenerationStats) for event in events[:-1])
    return "".join(event.text for event in events if isinstance(event, TextPiece)), events[-1]


def fixed_length(tokens: int, **settings: object) -> SamplingParams:
    """A reply of exactly `tokens` tokens: a random model may sample its end token at any point."""
    return SamplingParams(**{"temperature": 0, "max_tokens": tokens, "ignore_eos": True, **settings})  # type: ignore[arg-type]


class ChatModelContract:
    """Subclass as `Test<Engine>ChatModel` and provide the `chat_model` and `load_with_context` fixtures."""

    def test_a_reply_streams_text_pieces_then_its_stats(self, chat_model: ChatModel) -> None:
        events = list(chat_model.stream_chat(HELLO, fixed_length(24)))
        text, stats = reply(events)
        assert len([e for e in events if isinstance(e, TextPiece)]) > 5, "a reply streams in pieces, not at once"
        assert text
        assert stats.generated_tokens == 24 and stats.stop_reason == "max_tokens"
        assert stats.prompt_tokens == chat_model.prompt_tokens(HELLO)
        assert stats.time_to_first_token_s > 0 and stats.generation_s > 0 and stats.tokens_per_second > 0

    def test_a_stop_string_ends_the_reply_and_is_not_shown(self, chat_model: ChatModel) -> None:
        full, _ = reply(list(chat_model.stream_chat(HELLO, fixed_length(40))))
        middle = len(full) // 2
        stop = full[middle : middle + 3]
        assert stop.strip(), f"the random model's reply has too little text to pick a stop string from: {full!r}"
        text, stats = reply(list(chat_model.stream_chat(HELLO, fixed_length(40, stop=(stop,)))))
        assert stats.stop_reason == "stop_string"
        assert text == full[: full.find(stop)]

    def test_cancel_from_another_thread_ends_the_reply_within_a_token(self, chat_model: ChatModel) -> None:
        cancel = threading.Event()
        stream = chat_model.stream_chat(HELLO, fixed_length(200), cancel)
        before = next(event for event in stream if isinstance(event, TextPiece))
        setter = threading.Thread(target=cancel.set)
        setter.start()
        setter.join()
        after = list(stream)
        _, stats = reply([before, *after])
        assert stats.stop_reason == "cancelled"
        # The stream was paused at the token that made `before`: at most what that token left pending (a stop-string
        # or UTF-8 tail) follows, and no token is sampled after the cancel.
        assert len([e for e in after if isinstance(e, TextPiece)]) <= 1
        assert stats.generated_tokens < 200

    def test_greedy_decoding_is_deterministic_across_replies(self, chat_model: ChatModel) -> None:
        first, _ = reply(list(chat_model.stream_chat(HELLO, fixed_length(24))))
        reply(list(chat_model.stream_chat([ChatMessage("user", "Something else entirely.")], fixed_length(8))))
        second, _ = reply(list(chat_model.stream_chat(HELLO, fixed_length(24))))
        assert first == second and first

    def test_the_same_seed_samples_the_same_reply(self, chat_model: ChatModel) -> None:
        sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24, ignore_eos=True, seed=1234)
        first, _ = reply(list(chat_model.stream_chat(HELLO, sampling)))
        second, _ = reply(list(chat_model.stream_chat(HELLO, sampling)))
        assert first == second

    @pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}], ids=["top_k=1", "top_p~0", "min_p=1"])
    def test_sampling_narrowed_to_the_likeliest_token_is_greedy(self, chat_model: ChatModel, narrowing: dict[str, float]) -> None:
        # As in llama.cpp's chain: each filter keeps at least one token, the likeliest; at temperature 2 any other
        # token left in would be drawn within 24 tokens of a random model's flat distribution.
        greedy, _ = reply(list(chat_model.stream_chat(HELLO, fixed_length(24))))
        sampling = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, **narrowing}
        narrowed, _ = reply(list(chat_model.stream_chat(HELLO, fixed_length(24, temperature=2.0, seed=7, **sampling))))
        assert narrowed == greedy

    def test_a_conversation_longer_than_the_context_drops_its_oldest_turns(self, load_with_context: Callable[[int], ChatModel]) -> None:
        model = load_with_context(96)
        try:
            turns = []
            for index in range(8):
                turns += [ChatMessage("user", f"Question {index}: the quick brown fox jumps over the lazy dog."),
                          ChatMessage("assistant", "Pack my box with five dozen liquor jugs.")]  # fmt: skip
            events = list(model.stream_chat([*turns, ChatMessage("user", "And now?")], fixed_length(8)))
            trimmed = [event for event in events if isinstance(event, ContextTrimmed)]
            _, stats = reply(events)
            assert trimmed and trimmed[0] is events[0], "the trim is told before any text"
            assert trimmed[0].dropped_messages > 0 and trimmed[0].context_length == 96
            assert stats.prompt_tokens + 8 <= 96 and stats.generated_tokens == 8
        finally:
            model.close()

    # The members measurements and quality checks use (benchmarks, perplexity, verify).

    def test_tokenize_puts_the_bos_first_only_where_the_model_adds_one(self, chat_model: ChatModel, tokenizer_facts: TokenizerFacts) -> None:
        facts = tokenizer_facts
        tokens = chat_model.tokenize(DOCUMENT)
        text_tokens = chat_model.count_tokens(DOCUMENT)
        if facts.adds_bos:
            assert tokens[0] == facts.bos_id and tokens.count(facts.bos_id) == 1 and len(tokens) == text_tokens + 1
        else:
            assert facts.bos_id not in tokens and len(tokens) == text_tokens
        with_control = chat_model.tokenize(f"{DOCUMENT} {facts.control_text} more")
        assert facts.control_id not in with_control, "a control token's text in a document is text"

    def test_chat_prompt_tokens_are_the_tokens_a_reply_evaluates(self, chat_model: ChatModel) -> None:
        tokens = chat_model.chat_prompt_tokens(HELLO)
        _, stats = reply(list(chat_model.stream_chat(HELLO, fixed_length(4))))
        assert len(tokens) == stats.prompt_tokens == chat_model.prompt_tokens(HELLO)
        assert all(isinstance(token, int) for token in tokens)

    def test_a_reply_times_its_prefill_apart_from_the_first_token(self, chat_model: ChatModel) -> None:
        reply(list(chat_model.stream_chat(HELLO, fixed_length(4))))
        # The same conversation again: an engine that keeps its cache evaluates only what it does not hold (llama.cpp
        # at least the last prompt token, whose logits the first sample reads), the others all of it.
        _, stats = reply(list(chat_model.stream_chat(HELLO, fixed_length(4))))
        assert 1 <= stats.prompt_evaluated_tokens <= stats.prompt_tokens
        assert 0 < stats.prefill_s <= stats.time_to_first_token_s and stats.prompt_tokens_per_second > 0

    def test_stream_tokens_evaluates_every_prompt_token_every_time(self, chat_model: ChatModel) -> None:
        prompt = chat_model.chat_prompt_tokens(HELLO)
        reply(list(chat_model.stream_chat(HELLO, fixed_length(4))))  # leaves this prompt in any cache the engine keeps
        for _ in range(2):
            text, stats = reply(list(chat_model.stream_tokens(prompt, fixed_length(12))))
            assert text and stats.generated_tokens == 12 and stats.stop_reason == "max_tokens"
            assert stats.prompt_tokens == stats.prompt_evaluated_tokens == len(prompt)
            assert 0 < stats.prefill_s <= stats.time_to_first_token_s
            assert stats.prompt_tokens_per_second > 0 and stats.generation_s > 0 and stats.tokens_per_second > 0

    def test_stream_tokens_continues_a_document_without_a_template(self, chat_model: ChatModel) -> None:
        prompt = chat_model.tokenize(DOCUMENT)
        _, stats = reply(list(chat_model.stream_tokens(prompt, fixed_length(6))))
        assert stats.prompt_tokens == stats.prompt_evaluated_tokens == len(prompt) and stats.generated_tokens == 6
        _, single = reply(list(chat_model.stream_tokens(prompt[:1], fixed_length(6))))
        assert single.prompt_evaluated_tokens == 1 and single.generated_tokens == 6

    def test_log_likelihood_is_the_log_softmax_of_token_logits_at_the_next_token(self, chat_model: ChatModel) -> None:
        tokens = chat_model.tokenize(DOCUMENT)
        scores = chat_model.log_likelihood(tokens)
        assert scores.dtype == np.float64 and scores.shape == (len(tokens) - 1,)
        assert (scores <= 0).all() and np.isfinite(scores).all()
        logits = chat_model.token_logits(tokens).astype(np.float64)
        peaks = logits.max(axis=1, keepdims=True)
        log_softmax = logits - peaks - np.log(np.exp(logits - peaks).sum(axis=1, keepdims=True))
        expected = log_softmax[np.arange(len(tokens) - 1), tokens[1:]]
        # log_likelihood may run the model over n-1 tokens where token_logits ran it over n: the same float32 maths,
        # blocked differently, moves a logit by a few units in the last place (|logit| < 30 here: well under 1e-5).
        # A row scored against the wrong token, or the wrong row, is off by far more than 1e-4.
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)

    def test_prompts_that_leave_no_room_are_refused_and_a_full_context_ends_the_reply(
        self, load_with_context: Callable[[int], ChatModel]
    ) -> None:
        model = load_with_context(64)
        try:
            tokens = model.tokenize(DOCUMENT * 8)[:64]
            assert len(tokens) == 64
            _, stats = reply(list(model.stream_tokens(tokens[:63], SamplingParams(temperature=0, ignore_eos=True))))
            assert stats.generated_tokens == 1 and stats.stop_reason == "context_full"
            for prompt in ([], tokens):
                with pytest.raises(PocketError, match=rf"^stream_tokens takes 1 to 63 tokens .*, not {len(prompt)}\."):
                    list(model.stream_tokens(prompt, fixed_length(4)))
            assert model.log_likelihood(tokens).shape == (63,)
            for scored in (tokens[:1], [*tokens, tokens[0]]):
                with pytest.raises(PocketError, match=rf"^log_likelihood takes 2 to 64 tokens \(the loaded context\), not {len(scored)}\."):
                    model.log_likelihood(scored)
        finally:
            model.close()
        with pytest.raises(PocketError, match="was closed"):
            list(model.stream_tokens(tokens[:8], fixed_length(4)))
        with pytest.raises(PocketError, match="was closed"):
            model.log_likelihood(tokens[:8])
