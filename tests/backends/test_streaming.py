"""Stop strings split across tokens are still caught, and no text before them is withheld for long."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from pocketlm.backends.base import EngineTimings, GenerationStats, SamplingParams
from pocketlm.backends.streaming import BytePieces, ReplyEngine, StopStringFilter, WindowDecoder, stream_prompt
from pocketlm.models.errors import PocketError


def feed_all(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], bool]:
    stop_filter = StopStringFilter(stop)
    shown = []
    for piece in pieces:
        shown.append(stop_filter.feed(piece))
        if stop_filter.stopped:
            return shown, True
    shown.append(stop_filter.flush())
    return shown, False


def test_stop_string_split_over_pieces() -> None:
    shown, stopped = feed_all(["Hello", " Us", "er:", " more"], ("User:",))
    assert stopped and "".join(shown) == "Hello "


def test_partial_match_is_released_when_it_does_not_complete() -> None:
    shown, stopped = feed_all(["Hello", " Us", "ually"], ("User:",))
    assert not stopped and "".join(shown) == "Hello Usually"
    assert shown[1] == " ", "'Us' could begin 'User:', so it waits; the space before it cannot"


def test_earliest_of_several_stop_strings_wins() -> None:
    shown, stopped = feed_all(["a END b STOP"], ("STOP", "END"))
    assert stopped and "".join(shown) == "a "


def test_no_stop_strings_passes_everything_through() -> None:
    shown, stopped = feed_all(["x", "y"], ())
    assert not stopped and shown == ["x", "y", ""]


def test_a_character_split_over_byte_pieces_shows_once_whole() -> None:
    spelled = {1: "caf".encode(), 2: "é".encode()[:1], 3: "é".encode()[1:], 4: " 🤖".encode()[:3], 5: " 🤖".encode()[3:]}
    pieces = BytePieces(spelled.__getitem__)
    shown = [pieces.feed(token) for token in spelled] + [pieces.finish()]
    assert shown == ["caf", "", "é", " ", "🤖", ""]


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real transformers tokenizer with byte fallback: characters outside its 600 pieces are spelled in bytes."""
    from transformers import AutoTokenizer

    from tests.converters.tiny_models import train_sentencepiece_tokenizer

    return AutoTokenizer.from_pretrained(train_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm")))


def test_text_decoded_in_windows_is_the_whole_decoding_without_half_characters(sentencepiece_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Café in Zürich, 日本語 and 🤖🚀 — then   spaces\tand tabs. Über 3.14159!"
    ids = sentencepiece_tokenizer.encode(text, add_special_tokens=False)
    decode = lambda tokens: sentencepiece_tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
    assert any(sentencepiece_tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids), "the text must need byte tokens"
    decoder = WindowDecoder(decode)
    shown = [decoder.feed(token) for token in ids] + [decoder.finish()]
    assert "".join(shown) == decode(ids)
    assert not any("\ufffd" in piece for piece in shown)
    assert sum(1 for piece in shown if piece) > len(ids) // 2, "text streams as the tokens come, not at the end"


def test_prompt_speed_counts_the_evaluated_tokens_over_the_prefill_only() -> None:
    # 80 of 100 prompt tokens came from the cache: speed is over the 20 the engine computed.
    stats = GenerationStats(prompt_tokens=100, generated_tokens=1, time_to_first_token_s=0.5, generation_s=0.0,
                            stop_reason="max_tokens", prompt_evaluated_tokens=20, prefill_s=0.25)  # fmt: skip
    assert stats.prompt_tokens_per_second == 80.0 and stats.tokens_per_second == 0.0
    assert replace(stats, prefill_s=0.0).prompt_tokens_per_second == 0.0
    assert replace(stats, prompt_evaluated_tokens=0).prompt_tokens_per_second == 0.0


def test_engine_speeds_are_zero_where_the_engine_counted_no_time() -> None:
    timings = EngineTimings(prompt_tokens=40, prompt_s=0.2, generated_tokens=9, generation_s=0.09)
    assert timings.prompt_tokens_per_second == pytest.approx(200.0) and timings.tokens_per_second == pytest.approx(100.0)
    # llama.cpp reports at least 1 token for a phase it never ran, with no time.
    idle = EngineTimings(prompt_tokens=1, prompt_s=0.0, generated_tokens=1, generation_s=0.0)
    assert idle.prompt_tokens_per_second == 0.0 and idle.tokens_per_second == 0.0


def test_a_prompt_that_leaves_no_room_for_a_reply_is_refused_before_the_engine_starts() -> None:
    def start(prompt: list[int], sampling: SamplingParams):  # type: ignore[no-untyped-def]
        raise AssertionError("a refused prompt must not reach the engine")

    engine = ReplyEngine(context_length=8, render=lambda messages: [], take_notice=lambda: None, start=start)
    for prompt in ([], list(range(8))):
        message = rf"^stream_tokens takes 1 to 7 tokens \(the loaded context of 8 less 1 for the reply\), not {len(prompt)}\."
        with pytest.raises(PocketError, match=message) as refused:
            list(stream_prompt(engine, prompt, SamplingParams(), threading.Event()))
        assert refused.value.hint == "Give fewer tokens, or load the model with a larger --ctx."
