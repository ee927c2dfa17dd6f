"""A bench run's chart and table as files: the chart drawn by matplotlib (PNG or SVG, an optional extra), the table
as Markdown. Each is written beside its destination and renamed onto it once whole (converters.base.atomic_output)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.app.bench_series import QualityPoint, SpeedBar, quality_points, speed_bars, speed_test_names
from pocketlm.converters.base import atomic_output
from pocketlm.models.errors import PocketError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from pocketlm.app.bench_run import BenchRun

CHART_FORMATS = ("png", "svg")
CHARTS_HINT = "Install it: pip install 'pocketlm[charts]'."
_DPI = 150  # sharp enough for a README or a slide at the figure's 10 inches


def chart_format(destination: Path) -> str:
    """The image format `destination`'s suffix names; a PocketError for any other."""
    suffix = destination.suffix.lower().lstrip(".")
    if suffix not in CHART_FORMATS:
        raise PocketError(f"A chart is saved as PNG or SVG, not {destination.suffix or 'a file without a suffix'}.",
                          "End the file name with .png or .svg.")  # fmt: skip
    return suffix


def export_chart(run: BenchRun, destination: Path) -> Path:
    """Draw `run`'s tokens/s bars (mean with the repetitions' sd as error bars) and, when perplexity was measured,
    its speed-vs-quality scatter, into `destination` (.png or .svg)."""
    image_format = chart_format(destination)
    try:
        # The Figure API, not pyplot: no global state and no GUI backend, so it draws in any worker thread.
        from matplotlib.figure import Figure
    except ImportError:
        raise PocketError("Exporting a chart needs matplotlib, which is not installed.", CHARTS_HINT) from None
    bars, points = speed_bars(run), quality_points(run)
    if not bars:
        raise PocketError("This run has no measured speed to chart.", "Run the bench again; the table says why each model failed.")
    figure = Figure(figsize=(10, 4.5 if not points else 8.5), layout="constrained")
    axes = figure.subplots(2 if points else 1, 1, squeeze=False)[:, 0]
    _draw_speed(axes[0], bars, speed_test_names(run))
    if points:
        _draw_quality(axes[1], points)
    with atomic_output(destination) as temporary:
        # The temporary name does not end in .png/.svg: the format is said, not guessed from it.
        figure.savefig(temporary, format=image_format, dpi=_DPI)
    return destination


def export_table(run: BenchRun, destination: Path) -> Path:
    """`run`'s results table as Markdown (the same as `pocketlm bench --history ID --md`)."""
    from pocketlm.app.bench_report import to_markdown

    text = to_markdown(run)
    with atomic_output(destination) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return destination


def _draw_speed(axes: Axes, bars: list[SpeedBar], names: tuple[str, str]) -> None:
    width = 0.4
    positions = range(len(bars))
    for offset, name, spreads in ((-width / 2, names[0], [b.prompt for b in bars]), (width / 2, names[1], [b.generation for b in bars])):
        if all(spread is None for spread in spreads):
            continue  # the test was skipped (-p 0 or -n 0)
        means = [spread.mean if spread else 0.0 for spread in spreads]
        errors = [spread.sd if spread else 0.0 for spread in spreads]
        axes.bar([p + offset for p in positions], means, width, yerr=errors, capsize=3, label=name)
    axes.set_xticks(list(positions), [bar.label for bar in bars], rotation=15, ha="right")
    axes.set_ylabel("tokens/s")
    axes.set_title("Speed (mean ± sd over the repetitions)")
    axes.legend()


def _draw_quality(axes: Axes, points: list[QualityPoint]) -> None:
    axes.scatter([p.tokens_per_second for p in points], [p.perplexity for p in points])
    for point in points:
        axes.annotate(point.label, (point.tokens_per_second, point.perplexity), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.margins(0.15)  # room for the labels of the points at the edges
    axes.set_xlabel("generation tokens/s (faster →)")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title("Speed vs quality")
