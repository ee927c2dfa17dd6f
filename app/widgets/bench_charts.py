"""A bench run's charts in the terminal (textual-plotext): tokens/s per format × backend as grouped bars (prompt
processing and generation), and generation speed against perplexity where perplexity was measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual_plotext import PlotextPlot

from pocketlm.app.bench_series import quality_points, speed_bars, speed_test_names

if TYPE_CHECKING:
    from pocketlm.app.bench_run import BenchRun


class BenchCharts(Horizontal):
    def compose(self) -> ComposeResult:
        yield PlotextPlot(id="bench-speed-chart")
        yield PlotextPlot(id="bench-quality-chart")

    def show_run(self, run: BenchRun | None) -> None:
        """Draw `run` (None: empty charts)."""
        speed = self.query_one("#bench-speed-chart", PlotextPlot)
        quality = self.query_one("#bench-quality-chart", PlotextPlot)
        for plot in (speed, quality):
            plot.plt.clear_figure()
        bars = speed_bars(run) if run is not None else []
        points = quality_points(run) if run is not None else []
        quality.display = bool(points)  # the bars take the whole width when there is no perplexity to plot
        if bars:
            names = speed_test_names(run)  # type: ignore[arg-type]
            series = [(name, [getattr(bar, field) for bar in bars]) for name, field in zip(names, ("prompt", "generation"))]
            series = [(name, spreads) for name, spreads in series if any(spreads)]  # a skipped test (-p 0, -n 0) has no bars
            # Horizontal: the cells' names sit on the y axis, where a terminal has room for them.
            speed.plt.multiple_bar([bar.label for bar in bars], [[s.mean if s else 0.0 for s in spreads] for _, spreads in series],
                                   labels=[name for name, _ in series], orientation="horizontal")  # fmt: skip
        speed.plt.title("Tokens/s")
        if points:
            for point in points:
                quality.plt.scatter([point.tokens_per_second], [point.perplexity], label=point.label, marker="dot")
            quality.plt.title("Speed (tg t/s) vs perplexity")
        speed.refresh()
        quality.refresh()
