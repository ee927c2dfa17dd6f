"""perplexity: sliding windows over a text through the backend's log_likelihood, the same figure on every engine."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketlm.backends.base import ChatModel, LoadOptions
from pocketlm.backends.llamacpp import LlamaCppBackend
from pocketlm.backends.perplexity import perplexity, sliding_windows
from pocketlm.converters.calibration import HELD_OUT_TEXT
from pocketlm.models.errors import Cancelled, PocketError
from tests.backends.tiny_engines import ENGINES, engine_loader


@pytest.fixture(scope="module")
def tiny_gguf_model(tiny_llama_f32_gguf: Path) -> Iterator[ChatModel]:
    model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=256))
    yield model
    model.close()


@pytest.mark.parametrize(("tokens", "window"), [(2, 2), (10, 512), (100, 16), (101, 16), (1000, 33), (7, 3)])
def test_windows_score_every_token_but_the_first_once_with_half_a_window_of_context(tokens: int, window: int) -> None:
    windows = sliding_windows(tokens, window)
    scored: list[int] = []
    for number, span in enumerate(windows):
        assert 0 < span.end - span.begin <= window
        positions = list(range(span.end - span.scored, span.end))
        scored += positions
        if number > 0:  # past the first window, every scored token has at least window // 2 before it in its window
            assert positions[0] - span.begin >= window // 2
    assert scored == list(range(1, tokens))


def test_a_text_that_fits_one_window_is_scored_in_one(tiny_gguf_model: ChatModel) -> None:
    tokens = tiny_gguf_model.tokenize("The river runs to the sea, and the sea is never full.")
    result = perplexity(tiny_gguf_model, "The river runs to the sea, and the sea is never full.")
    assert (result.windows, result.scored_tokens) == (1, len(tokens) - 1)
    expected = math.exp(-float(tiny_gguf_model.log_likelihood(tokens).mean()))
    assert result.value == pytest.approx(expected, rel=1e-12)  # the same sums: only float64 summation order differs


def test_a_long_text_is_scored_in_windows_each_token_once(tiny_gguf_model: ChatModel) -> None:
    steps: list[tuple[int, int]] = []
    result = perplexity(tiny_gguf_model, HELD_OUT_TEXT, window=128, on_step=lambda *step: steps.append(step))
    tokens = tiny_gguf_model.tokenize(HELD_OUT_TEXT)
    assert result.scored_tokens == len(tokens) - 1
    assert result.windows == len(sliding_windows(len(tokens), 128)) > 1
    assert steps == [(done, result.windows) for done in range(1, result.windows + 1)]
    assert 1 < result.value < 10 * 600  # a random 600-token model: near uniform, never below certainty


def test_the_window_is_capped_at_the_loaded_context(tiny_llama_f32_gguf: Path) -> None:
    model = LlamaCppBackend().load(tiny_llama_f32_gguf, LoadOptions(context_length=32))
    try:
        text = HELD_OUT_TEXT[:600]  # about 300 tokens: a few windows of 32
        result = perplexity(model, text, window=512)
        assert result.windows == len(sliding_windows(len(model.tokenize(text)), 32)) > 1
    finally:
        model.close()


def test_a_text_of_fewer_than_two_tokens_is_refused(tiny_gguf_model: ChatModel) -> None:
    with pytest.raises(PocketError, match="at least two"):
        perplexity(tiny_gguf_model, "")


def test_cancelling_stops_between_windows(tiny_gguf_model: ChatModel) -> None:
    cancel = threading.Event()
    steps: list[int] = []

    def cancel_after_two(done: int, total: int) -> None:
        steps.append(done)
        if done == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        perplexity(tiny_gguf_model, HELD_OUT_TEXT, window=32, cancel=cancel, on_step=cancel_after_two)
    assert steps == [1, 2]


def test_every_engine_gives_the_same_perplexity_on_the_same_weights(tiny_llama: Path, tiny_llama_f32_gguf: Path) -> None:
    values = {}
    for engine in ENGINES:
        load = engine_loader(engine, tiny_llama, tiny_llama_f32_gguf)
        if load is None:
            continue
        model = load(256)
        try:
            values[engine] = perplexity(model, HELD_OUT_TEXT, window=64).value
        finally:
            model.close()
    assert len(values) >= 2
    # All float32 weights, identical: only the engines' summation orders differ. Measured: llama.cpp 1278.516, PyTorch
    # and MLX 1278.474 (3.3e-5 apart); 1e-3 leaves 30× room, while a wrong token or position would move it by far more.
    reference = values["llama.cpp"]
    for engine, value in values.items():
        assert value == pytest.approx(reference, rel=1e-3), engine


def test_llama_cpp_f16_and_torch_float32_agree_on_the_real_starter_model(starter_checkpoint: Path, converted_f16: Path) -> None:
    from pocketlm.backends.pytorch import TorchBackend

    checkpoint = TorchBackend().load(starter_checkpoint, LoadOptions(context_length=1024))
    gguf = LlamaCppBackend().load(converted_f16, LoadOptions(context_length=1024))
    try:
        torch_value, llama_value = perplexity(checkpoint, HELD_OUT_TEXT).value, perplexity(gguf, HELD_OUT_TEXT).value
    finally:
        checkpoint.close()
        gguf.close()
    # Measured 27.480 (PyTorch, float32) and 27.487 (llama.cpp, the weights rounded to f16): +0.03%. Rounding to f16
    # costs that; 0.5% is 18× it and a tenth of what Q4_K_M costs (+4.3%).
    assert llama_value == pytest.approx(torch_value, rel=5e-3)


def test_f16_perplexity_is_lower_than_q2_k_of_the_same_model(converted_f16: Path, quantized_q2_k: Path) -> None:
    values = {}
    for name, path in {"f16": converted_f16, "Q2_K": quantized_q2_k}.items():
        model = LlamaCppBackend().load(path, LoadOptions(context_length=1024))
        try:
            values[name] = perplexity(model, HELD_OUT_TEXT)
        finally:
            model.close()
    # Measured 27.5 and 35.5 (+29%): Q2_K keeps about 2.6 bits of each weight.
    assert values["f16"].value < values["Q2_K"].value
    assert values["f16"].scored_tokens == values["Q2_K"].scored_tokens
