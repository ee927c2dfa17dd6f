"""measure_speed: pp and tg through each backend's own streaming path, as llama-bench counts them. No test asserts a
speed: only that the figures exist, are positive and are summarised over the repetitions as llama-bench does."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketlm.backends.base import ChatModel
from pocketlm.backends.speed import SpeedResult, SpeedSettings, Spread, bench_prompt, measure_speed
from pocketlm.converters.calibration import HELD_OUT_TEXT
from pocketlm.models.errors import Cancelled, PocketError
from tests.backends.tiny_engines import ENGINES, engine_loader

TINY = SpeedSettings(n_prompt=16, n_gen=4, repetitions=3)


@pytest.fixture(scope="module", params=ENGINES)
def tiny_model(request: pytest.FixtureRequest, tiny_llama: Path, tiny_llama_f32_gguf: Path) -> Iterator[ChatModel]:
    load = engine_loader(request.param, tiny_llama, tiny_llama_f32_gguf)
    if load is None:
        pytest.skip(f"{request.param} is not installed")
    model = load(256)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tiny_result(tiny_model: ChatModel) -> SpeedResult:
    return measure_speed(tiny_model, TINY, HELD_OUT_TEXT)


def test_spread_is_the_mean_and_the_sample_standard_deviation_as_llama_bench_reports() -> None:
    spread = Spread.of([10.0, 12.0, 17.0])
    assert spread is not None
    assert spread.mean == pytest.approx(13.0)
    assert spread.sd == pytest.approx(statistics.stdev([10.0, 12.0, 17.0]))  # n-1, not n
    assert Spread.of([5.0]) == Spread(5.0, 0.0)
    assert Spread.of([]) is None


@pytest.mark.parametrize("settings", [{"n_prompt": 0, "n_gen": 0}, {"n_prompt": -1}, {"n_gen": -5}, {"repetitions": 0}])
def test_settings_that_measure_nothing_are_refused_with_a_sentence(settings: dict[str, int]) -> None:
    with pytest.raises(PocketError) as refused:
        SpeedSettings(**settings)
    assert refused.value.hint


def test_every_repetition_gives_positive_prompt_and_generation_speeds(tiny_model: ChatModel, tiny_result: SpeedResult) -> None:
    assert len(tiny_result.samples) == TINY.repetitions
    for sample in tiny_result.samples:
        assert sample.prompt_tokens_per_second is not None and sample.prompt_tokens_per_second > 0
        assert sample.tokens_per_second is not None and sample.tokens_per_second > 0
        assert sample.time_to_first_token_s is not None and sample.time_to_first_token_s > 0


def test_the_summary_is_computed_over_the_repetitions(tiny_result: SpeedResult) -> None:
    pp = [sample.prompt_tokens_per_second for sample in tiny_result.samples]
    tg = [sample.tokens_per_second for sample in tiny_result.samples]
    assert tiny_result.prompt_speed() == Spread(statistics.fmean(pp), statistics.stdev(pp))  # type: ignore[arg-type]
    assert tiny_result.generation_speed() == Spread(statistics.fmean(tg), statistics.stdev(tg))  # type: ignore[arg-type]
    ttft = tiny_result.time_to_first_token()
    assert ttft is not None and ttft.mean > 0


def test_llama_cpp_reports_its_engine_figures_beside_ours_and_the_others_do_not(tiny_model: ChatModel, tiny_result: SpeedResult) -> None:
    engine_pp, engine_tg = tiny_result.engine_prompt_speed(), tiny_result.engine_generation_speed()
    if tiny_model.description.backend == "llama.cpp":
        assert engine_pp is not None and engine_pp.mean > 0
        assert engine_tg is not None and engine_tg.mean > 0
    else:
        assert engine_pp is None and engine_tg is None


def test_an_engine_figure_the_engine_did_not_count_is_none_not_zero(tiny_model: ChatModel) -> None:
    # -p 1: llama.cpp counts no prompt processing for a one-token prompt (it is a generation batch to it).
    result = measure_speed(tiny_model, SpeedSettings(n_prompt=1, n_gen=2, repetitions=1), HELD_OUT_TEXT)
    assert result.engine_prompt_speed() is None
    assert all(sample.engine_prompt_tokens_per_second is None for sample in result.samples)
    if tiny_model.description.backend == "llama.cpp":
        assert result.engine_generation_speed() is not None


def test_every_backend_with_the_same_tokenizer_measures_the_same_prompt_tokens(tiny_llama: Path, tiny_llama_f32_gguf: Path) -> None:
    digests = {}
    for engine in ENGINES:
        load = engine_loader(engine, tiny_llama, tiny_llama_f32_gguf)
        if load is None:
            continue
        model = load(256)
        try:
            digests[engine] = measure_speed(model, SpeedSettings(n_prompt=32, n_gen=2, repetitions=1), HELD_OUT_TEXT).prompt_digest
        finally:
            model.close()
    assert len(digests) >= 2 and len(set(digests.values())) == 1, digests


def test_the_bench_prompt_repeats_the_text_with_one_bos_and_cuts_it_to_length(tiny_model: ChatModel) -> None:
    text = "The river runs to the sea."
    document = tiny_model.tokenize(text)
    lead = tiny_model.tokenize("")  # the BOS, where this tokenizer adds one
    prompt = bench_prompt(tiny_model, text, 50)
    body = document[len(lead) :]
    assert len(prompt) == 50
    assert prompt[: len(document)] == document
    assert prompt[len(document) : len(document) + len(body)] == body  # repeated without a second BOS
    assert bench_prompt(tiny_model, text, 3) == document[:3]


def test_a_test_at_zero_length_is_left_out(tiny_model: ChatModel) -> None:
    steps: list[tuple[int, int]] = []
    result = measure_speed(tiny_model, SpeedSettings(n_prompt=0, n_gen=3, repetitions=2), HELD_OUT_TEXT, on_step=lambda *step: steps.append(step))
    assert result.prompt_speed() is None and result.time_to_first_token() is None
    generation = result.generation_speed()
    assert generation is not None and generation.mean > 0
    assert steps == [(1, 3), (2, 3), (3, 3)]  # one warm-up, two repetitions


def test_progress_counts_the_warm_ups_and_every_repetition_of_each_test(tiny_model: ChatModel) -> None:
    steps: list[tuple[int, int]] = []
    measure_speed(tiny_model, SpeedSettings(n_prompt=8, n_gen=2, repetitions=2), HELD_OUT_TEXT, on_step=lambda *step: steps.append(step))
    assert steps == [(done, 6) for done in range(1, 7)]


def test_cancelling_stops_the_measurement_with_cancelled(tiny_model: ChatModel) -> None:
    cancel = threading.Event()
    steps: list[int] = []

    def cancel_after_the_warm_ups(done: int, total: int) -> None:
        steps.append(done)
        if done == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        measure_speed(tiny_model, SpeedSettings(n_prompt=8, n_gen=2, repetitions=5), HELD_OUT_TEXT, cancel, cancel_after_the_warm_ups)
    assert steps == [1, 2]


def test_a_test_longer_than_the_loaded_context_is_refused_before_it_runs(tiny_model: ChatModel) -> None:
    context = tiny_model.description.context_length
    with pytest.raises(PocketError, match=f"loaded with {context}"):
        measure_speed(tiny_model, SpeedSettings(n_prompt=context - 8, n_gen=16, repetitions=1), HELD_OUT_TEXT)
    with pytest.raises(PocketError):
        measure_speed(tiny_model, SpeedSettings(n_prompt=context, n_gen=0, repetitions=1), HELD_OUT_TEXT)


def test_a_text_without_tokens_is_refused(tiny_model: ChatModel) -> None:
    with pytest.raises(PocketError, match="no tokens"):
        measure_speed(tiny_model, TINY, "")


def test_the_real_starter_model_is_measured_through_llama_cpp(starter_model: ChatModel) -> None:
    result = measure_speed(starter_model, SpeedSettings(n_prompt=32, n_gen=4, repetitions=2), HELD_OUT_TEXT)
    for spread in (result.prompt_speed(), result.generation_speed(), result.engine_prompt_speed(), result.engine_generation_speed()):
        assert spread is not None and spread.mean > 0 and spread.sd >= 0
