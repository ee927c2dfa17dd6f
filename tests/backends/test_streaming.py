"""Stop strings split across tokens are still caught, and no text before them is withheld for long."""

from __future__ import annotations

from pocketlm.backends.streaming import StopStringFilter


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
