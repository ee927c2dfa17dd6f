"""Prompt-processing and generation speed of a loaded model, measured as llama-bench does (pp512, tg128).

Each test runs the model's own streaming path (ChatModel.stream_tokens: what a user's reply goes through), after one
warm-up that is not counted, on prompt ids every backend with the same tokenizer gets identically (prompt_digest).
"""

from __future__ import annotations

import hashlib
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pocketlm.backends.base import ChatModel, GenerationStats, ReportsEngineTimings, SamplingParams
from pocketlm.models.errors import Cancelled, PocketError

# Greedy and without end of generation: every run does exactly the work asked for, whatever the model would say.
_BENCH_SAMPLING = SamplingParams(temperature=0.0, ignore_eos=True)
# The generation warm-up decodes a few tokens only: it is there to page the weights in and start the threads (as
# llama-bench's one-token tg warm-up), not to measure, and a full tg128 warm-up would cost as much as a repetition.
_GENERATION_WARM_UP_TOKENS = 8


@dataclass(frozen=True)
class SpeedSettings:
    n_prompt: int = 512  # llama-bench's pp512; 0 skips the prompt test
    n_gen: int = 128  # tg128; 0 skips the generation test
    repetitions: int = 5

    def __post_init__(self) -> None:
        if self.n_prompt < 0 or self.n_gen < 0 or (self.n_prompt == 0 and self.n_gen == 0):
            raise PocketError(f"A speed test needs a prompt or a generation length, not -p {self.n_prompt} -n {self.n_gen}.",
                              "Give -p and -n as whole numbers, at least one of them above 0 (the defaults are 512 and 128).")  # fmt: skip
        if self.repetitions < 1:
            raise PocketError(f"A speed test runs at least once, not {self.repetitions} times.", "Give -r 1 or more (the default is 5).")


@dataclass(frozen=True)
class SpeedSample:
    """One repetition."""

    prompt_tokens_per_second: float | None  # None when n_prompt == 0
    tokens_per_second: float | None  # None when n_gen == 0
    time_to_first_token_s: float | None  # the pp run's GenerationStats.time_to_first_token_s
    engine_prompt_tokens_per_second: float | None = None  # ReportsEngineTimings, llama.cpp only
    engine_tokens_per_second: float | None = None


@dataclass(frozen=True)
class Spread:
    mean: float
    sd: float  # sample standard deviation (n-1), 0.0 for one value: llama-bench's stddev

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        """The mean and sample standard deviation of `values`; None for no values."""
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class SpeedResult:
    settings: SpeedSettings
    samples: tuple[SpeedSample, ...]
    prompt_digest: str  # sha256 (first 16 hex) of the prompt ids: "the same prompt tokens" is checkable

    def prompt_speed(self) -> Spread | None:
        return Spread.of([s.prompt_tokens_per_second for s in self.samples if s.prompt_tokens_per_second is not None])

    def generation_speed(self) -> Spread | None:
        return Spread.of([s.tokens_per_second for s in self.samples if s.tokens_per_second is not None])

    def time_to_first_token(self) -> Spread | None:
        return Spread.of([s.time_to_first_token_s for s in self.samples if s.time_to_first_token_s is not None])

    def engine_prompt_speed(self) -> Spread | None:
        return Spread.of([s.engine_prompt_tokens_per_second for s in self.samples if s.engine_prompt_tokens_per_second is not None])

    def engine_generation_speed(self) -> Spread | None:
        return Spread.of([s.engine_tokens_per_second for s in self.samples if s.engine_tokens_per_second is not None])


def bench_prompt(model: ChatModel, text: str, n_prompt: int) -> list[int]:
    """`model.tokenize(text)` repeated (its BOS once, at the start) and cut to `n_prompt` ids."""
    lead = model.tokenize("")  # what the tokenizer puts before any document: its BOS, or nothing
    ids = model.tokenize(text)
    body = ids[len(lead) :] if ids[: len(lead)] == lead else ids
    if not body:
        raise PocketError("The benchmark text has no tokens.", "Give a text with some words in it.")
    repeats = -(-max(n_prompt - len(lead), 0) // len(body))
    return (lead + body * max(repeats, 1))[:n_prompt]


def prompt_digest(ids: Sequence[int]) -> str:
    """A short fingerprint of `ids`: two runs with the same digest measured the very same prompt tokens."""
    return hashlib.sha256(",".join(map(str, ids)).encode("ascii")).hexdigest()[:16]


@dataclass(frozen=True)
class _Run:
    stats: GenerationStats
    engine_speed: float | None  # the engine's own tokens/s for the same work (ReportsEngineTimings), when it counts


def measure_speed(
    model: ChatModel,
    settings: SpeedSettings,
    text: str,
    cancel: threading.Event | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> SpeedResult:
    """pp and tg speed over `settings.repetitions`, after one uncounted warm-up of each.

    Runs, in order: the pp warm-up, the tg warm-up, then per repetition pp then tg (a test whose length is 0 is left
    out); on_step(done, total) after each. pp continues the first n_prompt ids of `text` by one token: prompt
    processing alone. tg continues the first id by n_gen + 1 tokens, so that n_gen are decoded one at a time after the
    first (llama-bench's tg: n_gen single-token decodes), which is what GenerationStats.tokens_per_second times.
    Cancelling raises Cancelled.
    """
    cancel = cancel or threading.Event()
    _require_context(settings, model.description.context_length, model.description.name)
    prompt = bench_prompt(model, text, max(settings.n_prompt, 1))
    lengths = {test: length for test, length in (("pp", settings.n_prompt), ("tg", settings.n_gen)) if length > 0}
    total = len(lengths) * (1 + settings.repetitions)
    done = 0

    def run(test: str, warm_up: bool) -> _Run:
        nonlocal done
        if test == "pp":
            result = _run(model, prompt[: settings.n_prompt], 1, cancel, prompt_test=True)
        else:
            decoded = min(settings.n_gen, _GENERATION_WARM_UP_TOKENS) if warm_up else settings.n_gen
            result = _run(model, prompt[:1], decoded + 1, cancel, prompt_test=False)
        done += 1
        if on_step is not None:
            on_step(done, total)
        return result

    for test in lengths:
        run(test, warm_up=True)
    samples = [_sample({test: run(test, warm_up=False) for test in lengths}) for _ in range(settings.repetitions)]
    return SpeedResult(settings, tuple(samples), prompt_digest(prompt[: max(settings.n_prompt, 1)]))


def _sample(runs: dict[str, _Run]) -> SpeedSample:
    pp, tg = runs.get("pp"), runs.get("tg")
    return SpeedSample(
        prompt_tokens_per_second=pp.stats.prompt_tokens_per_second if pp else None,
        tokens_per_second=tg.stats.tokens_per_second if tg else None,
        time_to_first_token_s=pp.stats.time_to_first_token_s if pp else None,
        engine_prompt_tokens_per_second=pp.engine_speed if pp else None,
        engine_tokens_per_second=tg.engine_speed if tg else None,
    )


def _run(model: ChatModel, prompt: list[int], max_tokens: int, cancel: threading.Event, prompt_test: bool) -> _Run:
    if cancel.is_set():
        raise _cancelled()
    stats: GenerationStats | None = None
    for event in model.stream_tokens(prompt, replace(_BENCH_SAMPLING, max_tokens=max_tokens), cancel):
        if isinstance(event, GenerationStats):
            stats = event
    if stats is None or stats.stop_reason == "cancelled":
        raise _cancelled()
    engine_speed = None
    if isinstance(model, ReportsEngineTimings):  # counted since this run started
        timings = model.engine_timings()
        # 0.0: the engine counted nothing for this test (a one-token prompt is not prompt processing to llama.cpp).
        engine_speed = (timings.prompt_tokens_per_second if prompt_test else timings.tokens_per_second) or None
    return _Run(stats, engine_speed)


def _cancelled() -> Cancelled:
    return Cancelled("The speed test was cancelled.", "Run it again to measure.")


def _require_context(settings: SpeedSettings, context_length: int, model_name: str) -> None:
    """Refuse a test the loaded context cannot hold: pp takes n_prompt ids and samples one more, tg one id and
    n_gen + 1 more; like llama-bench, the two together must fit too (it sizes its context n_prompt + n_gen)."""
    needed = max(settings.n_prompt + settings.n_gen, settings.n_prompt + 1, settings.n_gen + 2)
    if needed > context_length:
        raise PocketError(f"pp{settings.n_prompt} and tg{settings.n_gen} need {needed} tokens of context, and {model_name} is loaded with {context_length}.",
                          "Give smaller -p/-n, or load the model with a larger context.")  # fmt: skip
