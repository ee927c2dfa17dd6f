"""Stop strings split across tokens are still caught, and no text before them is withheld for long."""

from __future__ import annotations

import pytest

from pocketlm.backends.streaming import BytePieces, StopStringFilter, WindowDecoder


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
