"""What every ChatModel must do, whatever its engine: a class of tests each backend's test file subclasses with a
`chat_model` fixture (a tiny random model on that engine) and a `load_with_context` fixture (loads that tiny model
with a given context length), so a new backend is held to the same stream."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from pocketlm.backends.base import ChatMessage, ChatModel, ContextTrimmed, GenerationEvent, GenerationStats, SamplingParams, TextPiece

HELLO = [ChatMessage("user", "Hello there, tell me something.")]


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
