"""The llama.cpp backend against the real starter model (SmolLM2-135M-Instruct, Q4_1)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pocketlm.backends.base import (
    ChatMessage,
    ChatModel,
    ContextTrimmed,
    GenerationEvent,
    GenerationStats,
    LoadOptions,
    ReportsEngineTimings,
    SamplingParams,
    TextPiece,
)
from pocketlm.backends.llamacpp import LlamaCppBackend, LlamaCppChatModel
from pocketlm.models.errors import ContextOverflow, NotEnoughMemory
from tests.backends.chat_model_contract import HELLO, ChatModelContract, TokenizerFacts, fixed_length, reply
from tests.backends.tiny_gguf import SPECIAL_TOKENS, tiny_llama_gguf_path
from tests.fixtures import CONCISE_SYSTEM_PROMPT, capital_question

CAPITAL_QUESTION = capital_question()
GREEDY = SamplingParams(temperature=0, max_tokens=32)


def collect(events: list[GenerationEvent]) -> tuple[str, GenerationStats]:
    assert isinstance(events[-1], GenerationStats), "the stream must end with its stats"
    assert all(not isinstance(event, GenerationStats) for event in events[:-1])
    return "".join(e.text for e in events if isinstance(e, TextPiece)), events[-1]


def test_greedy_reply_names_paris(starter_model: ChatModel) -> None:
    text, stats = collect(list(starter_model.stream_chat(CAPITAL_QUESTION, GREEDY)))
    assert "Paris" in text
    assert stats.stop_reason == "end_of_generation"


def test_greedy_decoding_is_deterministic(starter_model: ChatModel) -> None:
    question = [ChatMessage("user", "Write a haiku about the sea.")]
    first, _ = collect(list(starter_model.stream_chat(question, GREEDY)))
    collect(list(starter_model.stream_chat([ChatMessage("user", "Count to five.")], GREEDY)))  # another prompt between
    second, _ = collect(list(starter_model.stream_chat(question, GREEDY)))
    assert first == second and first


def test_greedy_reply_picks_what_the_sampler_chain_would(starter_model: ChatModel) -> None:
    # Greedy takes the argmax of the logits itself (llamacpp_decoding.DecodeLoop.sample); a chain keeping only the top
    # token (top-k 1) must pick the same token at every step, on the same logits.
    question = [ChatMessage("user", "Write a haiku about the sea.")]
    greedy, _ = collect(list(starter_model.stream_chat(question, GREEDY)))
    chained, _ = collect(list(starter_model.stream_chat(question, SamplingParams(temperature=1.0, top_k=1, max_tokens=32, seed=3))))
    assert greedy == chained and greedy


def test_same_seed_same_sample(starter_model: ChatModel) -> None:
    question = [ChatMessage("user", "Tell me a story about a cat.")]
    sampling = SamplingParams(temperature=1.0, max_tokens=24, seed=1234)
    first, _ = collect(list(starter_model.stream_chat(question, sampling)))
    second, _ = collect(list(starter_model.stream_chat(question, sampling)))
    assert first == second


def test_streaming_yields_pieces_then_stats(starter_model: ChatModel) -> None:
    events = list(starter_model.stream_chat([ChatMessage("user", "Tell me about the moon.")], SamplingParams(temperature=0, max_tokens=40)))
    text, stats = collect(events)
    pieces = [e for e in events if isinstance(e, TextPiece)]
    assert len(pieces) > 10, "a reply must stream in many pieces, not arrive at once"
    assert stats.generated_tokens == 40 and stats.stop_reason == "max_tokens"
    assert stats.prompt_tokens == starter_model.prompt_tokens([ChatMessage("user", "Tell me about the moon.")])
    assert stats.time_to_first_token_s > 0 and stats.tokens_per_second > 0
    # Every generated token's text was streamed: re-tokenizing the reply gives about as many tokens.
    assert abs(starter_model.count_tokens(text) - stats.generated_tokens) <= 3


def test_cancel_stops_within_one_token(starter_model: ChatModel) -> None:
    cancel = threading.Event()
    pieces_after_cancel = 0
    stats = None
    for event in starter_model.stream_chat([ChatMessage("user", "Write a long essay about rivers.")], SamplingParams(temperature=0, max_tokens=500), cancel):
        if isinstance(event, TextPiece):
            if cancel.is_set():
                pieces_after_cancel += 1
            elif len(event.text) and not cancel.is_set():
                cancel.set()
        elif isinstance(event, GenerationStats):
            stats = event
    assert stats is not None and stats.stop_reason == "cancelled"
    assert pieces_after_cancel == 0
    assert stats.generated_tokens <= 2


def test_stop_string_cuts_the_reply(starter_model: ChatModel) -> None:
    events = list(starter_model.stream_chat(CAPITAL_QUESTION, SamplingParams(temperature=0, max_tokens=32, stop=("Paris",))))
    text, stats = collect(events)
    assert stats.stop_reason == "stop_string"
    assert "Paris" not in text and "France" in text


def test_context_overflow_drops_the_oldest_turns(starter_gguf: Path) -> None:
    model = LlamaCppBackend().load(starter_gguf, LoadOptions(context_length=256))
    try:
        filler = "The quick brown fox jumps over the lazy dog. " * 6
        history = [ChatMessage("system", CONCISE_SYSTEM_PROMPT)]
        for turn in range(6):
            history += [ChatMessage("user", f"Remember fact {turn}: {filler}"), ChatMessage("assistant", f"Noted fact {turn}.")]
        history.append(ChatMessage("user", "What is the capital of France?"))
        assert model.prompt_tokens(history) > 256
        events = list(model.stream_chat(history, SamplingParams(temperature=0, max_tokens=32)))
        trimmed = [e for e in events if isinstance(e, ContextTrimmed)]
        text, stats = collect(events)
        assert len(trimmed) == 1 and trimmed[0].dropped_messages >= 2
        assert trimmed[0].dropped_messages % 2 == 0, "turns are dropped in user/assistant pairs"
        assert stats.prompt_tokens + stats.generated_tokens <= 256
        assert "Paris" in text
    finally:
        model.close()


def test_a_message_too_long_for_the_context_is_a_clear_error(starter_gguf: Path) -> None:
    model = LlamaCppBackend().load(starter_gguf, LoadOptions(context_length=128))
    try:
        with pytest.raises(ContextOverflow, match="more than the .* this context leaves"):
            list(model.stream_chat([ChatMessage("user", "word " * 400)], GREEDY))
    finally:
        model.close()


def test_reply_stops_when_the_context_is_full(starter_gguf: Path) -> None:
    model = LlamaCppBackend().load(starter_gguf, LoadOptions(context_length=96))
    try:
        _, stats = collect(list(model.stream_chat([ChatMessage("user", "Count from one to one thousand.")], SamplingParams(temperature=0, ignore_eos=True))))
        assert stats.stop_reason == "context_full"
        assert stats.prompt_tokens + stats.generated_tokens == 96
    finally:
        model.close()


def test_model_without_a_chat_template_uses_chatml(template_free_gguf: Path) -> None:
    model = LlamaCppBackend().load(template_free_gguf, LoadOptions(context_length=512))
    try:
        assert model._summary.chat_template is None  # type: ignore[attr-defined]
        text, _ = collect(list(model.stream_chat(CAPITAL_QUESTION, GREEDY)))
        # SmolLM2 was tuned on ChatML, so the fallback is its own format and it still answers.
        assert "Paris" in text
    finally:
        model.close()


def test_too_big_for_memory_is_refused_with_the_numbers(starter_gguf: Path) -> None:
    # 8M tokens of f16 KV cache for this model is about 172 GiB: more than any test machine has free.
    with pytest.raises(NotEnoughMemory, match=r"needs about \d+\.\d GiB .* only \d+\.\d GiB of memory is free"):
        LlamaCppBackend().load(starter_gguf, LoadOptions(context_length=8_000_000))


@pytest.fixture(scope="module")
def tiny_gguf_model() -> Iterator[LlamaCppChatModel]:
    model = LlamaCppBackend().load(tiny_llama_gguf_path(), LoadOptions(context_length=256))
    yield model
    model.close()


class TestLlamaCppChatModel(ChatModelContract):
    """The stream every backend owes (tests/backends/chat_model_contract.py), on the tiny random GGUF."""

    @pytest.fixture
    def chat_model(self, tiny_gguf_model: LlamaCppChatModel) -> LlamaCppChatModel:
        return tiny_gguf_model

    @pytest.fixture
    def load_with_context(self) -> Callable[[int], ChatModel]:
        return lambda context_length: LlamaCppBackend().load(tiny_llama_gguf_path(), LoadOptions(context_length=context_length))

    @pytest.fixture
    def tokenizer_facts(self) -> TokenizerFacts:
        # As tests/backends/tiny_gguf.py writes it: BOS id 1 with add_bos_token false, <|im_end|> a control token.
        return TokenizerFacts(bos_id=1, adds_bos=False, control_text="<|im_end|>", control_id=SPECIAL_TOKENS.index("<|im_end|>"))


def test_the_engine_counts_what_the_latest_reply_evaluated_and_decoded(tiny_gguf_model: LlamaCppChatModel) -> None:
    assert isinstance(tiny_gguf_model, ReportsEngineTimings)
    prompt = tiny_gguf_model.tokenize("the quick brown fox jumps over the lazy dog " * 3)
    _, stats = reply(list(tiny_gguf_model.stream_tokens(prompt, fixed_length(10))))
    timings = tiny_gguf_model.engine_timings()
    # The prompt goes in batches; every sampled token but the last is fed back one at a time.
    assert timings.prompt_tokens == stats.prompt_evaluated_tokens == len(prompt)
    assert timings.generated_tokens == stats.generated_tokens - 1 == 9
    assert timings.prompt_s > 0 and timings.generation_s > 0
    assert timings.prompt_tokens_per_second > 0 and timings.tokens_per_second > 0


def test_a_one_token_prompt_counts_as_neither_prompt_nor_generation_to_the_engine(tiny_gguf_model: LlamaCppChatModel) -> None:
    # llama.cpp counts a one-token batch as generation: left in, a tg run's figure would hold its prefill too.
    prompt = tiny_gguf_model.tokenize("the")[:1]
    reply(list(tiny_gguf_model.stream_tokens(prompt, fixed_length(10))))
    timings = tiny_gguf_model.engine_timings()
    assert timings.prompt_tokens == 0 and timings.prompt_tokens_per_second == 0.0
    assert timings.generated_tokens == 9, "the reply's own decodes, every token but the last fed back"


def test_a_follow_up_turn_evaluates_only_what_the_cache_does_not_hold(tiny_gguf_model: LlamaCppChatModel) -> None:
    reply(list(tiny_gguf_model.stream_chat(HELLO, fixed_length(6))))
    follow_up = [*HELLO, ChatMessage("assistant", "A fox."), ChatMessage("user", "Tell me more about the fox, please.")]
    _, stats = reply(list(tiny_gguf_model.stream_chat(follow_up, fixed_length(6))))
    # The first turn's prompt (up to "<|im_start|>assistant\n") is still in the cache; the rest is new.
    first_prompt = len(tiny_gguf_model.chat_prompt_tokens(HELLO))
    assert 1 < stats.prompt_evaluated_tokens <= stats.prompt_tokens - first_prompt
    timings = tiny_gguf_model.engine_timings()
    assert timings.prompt_tokens == stats.prompt_evaluated_tokens, "the counters start again with each reply"
    assert timings.generated_tokens == 5
