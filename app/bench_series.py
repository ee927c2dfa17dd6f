"""What the Bench screen's charts and their exports plot, read from a BenchRun: one source for the terminal chart
(textual-plotext) and the exported one (matplotlib), so both show the same bars and points under the same names."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pocketlm.app.bench_run import BenchCell, BenchRun
    from pocketlm.backends.speed import Spread


@dataclass(frozen=True)
class SpeedBar:
    """One measured cell's speeds: prompt processing and generation tokens/s (None where the test was skipped)."""

    label: str
    prompt: Spread | None
    generation: Spread | None


@dataclass(frozen=True)
class QualityPoint:
    """One cell measured for both speed and perplexity: a point of the speed-vs-quality scatter."""

    label: str
    tokens_per_second: float
    perplexity: float


def cell_labels(cells: list[BenchCell]) -> list[str]:
    """A short name per cell, "Q4_K_M gguf · llama.cpp" (the chart compares formats × backends); a cell whose
    short name another cell shares (two models of one format) gets its model's name in front."""
    short = [f"{cell.quantization} {cell.format} · {cell.backend}" if cell.quantization else f"{cell.format} · {cell.backend}"
             for cell in cells]  # fmt: skip
    seen = Counter(short)
    return [f"{cell.model}: {label}" if seen[label] > 1 else label for cell, label in zip(cells, short)]


def speed_bars(run: BenchRun) -> list[SpeedBar]:
    """The cells that measured a speed, in the run's order; failed cells have nothing to draw."""
    measured = [result for result in run.results if result.speed is not None]
    labels = cell_labels([result.cell for result in measured])
    return [SpeedBar(label, result.speed.prompt_speed(), result.speed.generation_speed())  # type: ignore[union-attr]
            for label, result in zip(labels, measured)]  # fmt: skip


def quality_points(run: BenchRun) -> list[QualityPoint]:
    """Generation tokens/s against perplexity, for the cells that measured both; an infinite or NaN perplexity (a
    token the model gave no chance) has no place on an axis and is left out (the table shows it)."""
    measured = [result for result in run.results if result.speed is not None]
    labels = cell_labels([result.cell for result in measured])
    points = []
    for label, result in zip(labels, measured):
        generation = result.speed.generation_speed()  # type: ignore[union-attr]
        if generation is not None and result.perplexity is not None and math.isfinite(result.perplexity.value):
            points.append(QualityPoint(label, generation.mean, result.perplexity.value))
    return points


def speed_test_names(run: BenchRun) -> tuple[str, str]:
    """The run's two tests as llama-bench names them: ("pp512", "tg128")."""
    from pocketlm.app.bench_report import test_label

    settings = run.request.settings
    return test_label("pp", settings.n_prompt), test_label("tg", settings.n_gen)
