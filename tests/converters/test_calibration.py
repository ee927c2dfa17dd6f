"""Calibration text, shared by GGUF's importance matrix and GPTQ: the built-in text, a user's file, and chunking."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.converters.base import ConversionError
from pocketlm.converters.calibration import BUILTIN, BUILTIN_CALIBRATION_TEXT, calibration_chunks, calibration_text


def test_builtin_names_the_builtin_text() -> None:
    assert calibration_text(BUILTIN) == BUILTIN_CALIBRATION_TEXT


def test_a_users_text_file_is_read_as_utf8(tmp_path: Path) -> None:
    text = "Un café au lait, s'il vous plaît. " * 20
    (tmp_path / "calibration.txt").write_text(text, encoding="utf-8")
    assert calibration_text(str(tmp_path / "calibration.txt")) == text


@pytest.mark.parametrize(("content", "words"), [(b"too short", "too short"), (b"\xff\xfe not utf-8 " * 40, "Cannot read")])
def test_an_unusable_calibration_file_is_refused_with_a_sentence(tmp_path: Path, content: bytes, words: str) -> None:
    (tmp_path / "calibration.txt").write_bytes(content)
    with pytest.raises(ConversionError, match=words):
        calibration_text(str(tmp_path / "calibration.txt"))


def test_a_missing_calibration_file_is_refused_with_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="Cannot read the calibration text"):
        calibration_text(str(tmp_path / "missing.txt"))


def test_chunks_are_consecutive_and_the_last_one_may_be_shorter() -> None:
    assert calibration_chunks(list(range(10)), 4, 10) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_chunks_stop_at_the_limit() -> None:
    assert calibration_chunks(list(range(100)), 10, 3) == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]


def test_no_tokens_give_no_chunks() -> None:
    assert calibration_chunks([], 512, 64) == []
