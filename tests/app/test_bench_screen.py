"""The Bench screen driven with Pilot: choose the starter model and llama.cpp, run a tiny bench, see its results, cancel
one, export the chart and the table, and show a past run again. No test asserts a speed: a recorded run (fixed
figures, saved into the history by the test) stands for the charts and exports, and a real run is checked for
positive, complete figures only."""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from textual.widgets import DataTable, Input, TabbedContent

from pocketlm.app.bench_history import BenchHistory
from pocketlm.app.bench_run import BenchCell, BenchRequest, BenchResult, BenchRun
from pocketlm.app.chart_export import export_chart
from pocketlm.app.pocket_app import PocketApp
from pocketlm.app.screens.bench import BenchScreen
from pocketlm.app.screens.dialogs import TextPromptDialog
from pocketlm.app.system_info import SystemInfo
from pocketlm.backends.base import LoadOptions
from pocketlm.backends.perplexity import Perplexity
from pocketlm.backends.speed import SpeedResult, SpeedSample, SpeedSettings
from pocketlm.models.errors import PocketError
from pocketlm.models.locations import database_path
from pocketlm.models.starter import STARTER
from pocketlm.models.store import ModelStore
from tests.app.test_chat_app import SIZE, wait_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cell(model: str, model_format: str, quantization: str, backend: str, size_bytes: int) -> BenchCell:
    return BenchCell(model=model, path=Path("/models") / model, format=model_format, quantization=quantization, size_bytes=size_bytes,
                     parameter_count=134_515_008, backend=backend)  # fmt: skip


def _speed(prompt: list[float], generation: list[float], engine: bool = False) -> SpeedResult:
    """Recorded repetitions; with `engine`, llama.cpp's own figures a little above ours (no Python around them)."""
    samples = tuple(SpeedSample(p, g, 0.05 + i / 100, p * 1.05 if engine else None, g * 1.05 if engine else None)
                    for i, (p, g) in enumerate(zip(prompt, generation, strict=True)))  # fmt: skip
    return SpeedResult(SpeedSettings(64, 16, 3), samples, "0123456789abcdef")


def recorded_run() -> BenchRun:
    """A run with fixed figures, as the history would hold it: three measured cells (with perplexity) and a failed one."""
    system = SystemInfo("x86_64", "Linux 6.1", "Test CPU 3000", 2, 4, 8 * 2**30, "", (("pocketlm", "0.1.0"),))
    results = (
        BenchResult(_cell("SmolLM2:Q4_1", "gguf", "Q4_1", "llama.cpp", 95_000_000), _speed([800, 820, 810], [60, 62, 61], engine=True), 0.4, 300_000_000, None,
                    Perplexity(21.5, 500, 2), 2, "CPU"),
        BenchResult(_cell("SmolLM2:f16", "gguf", "F16", "llama.cpp", 270_000_000), _speed([600, 610, 590], [40, 41, 39], engine=True), 0.6, 500_000_000, None,
                    Perplexity(19.8, 500, 2), 2, "CPU"),
        BenchResult(_cell("SmolLM2-hf", "safetensors", "BF16", "torch", 270_000_000), _speed([300, 310, 305], [15, 16, 15]), 2.1, 900_000_000, None,
                    Perplexity(19.7, 500, 2), 2, "CPU"),
        BenchResult(_cell("SmolLM2-hf", "safetensors", "BF16", "mlx", 270_000_000), None, 0.0, 0, None, None, 0, "",
                    "The mlx backend stopped while loading the model."),
    )  # fmt: skip
    request = BenchRequest(("SmolLM2:Q4_1", "SmolLM2:f16", "SmolLM2-hf"), (), SpeedSettings(64, 16, 3))
    return BenchRun(None, 1_700_000_000.0, system, request, results)


def save_recorded_run() -> BenchRun:
    history = BenchHistory(database_path())
    try:
        return history.save(recorded_run())
    finally:
        history.close()


async def open_bench(pilot) -> BenchScreen:  # type: ignore[no-untyped-def]
    await pilot.press("f6")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, BenchScreen))
    await pilot.pause()
    return pilot.app.screen


def bench_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "pocketlm.app.bench_cell" in " ".join(p.cmdline())]


# The chart export, on its own -------------------------------------------------------------------------------------


def test_chart_exports_as_a_whole_png_or_svg_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    png, svg = export_chart(recorded_run(), tmp_path / "speed.png"), export_chart(recorded_run(), tmp_path / "speed.SVG")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert ElementTree.parse(svg).getroot().tag.endswith("svg")
    text = svg.read_text()
    assert "Q4_1 gguf · llama.cpp" in text or "Q4_1 gguf" in text  # the bars are named by format × backend
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.SVG", "speed.png"]


def test_chart_export_refuses_a_name_that_is_not_png_or_svg(tmp_path: Path) -> None:
    with pytest.raises(PocketError, match="PNG or SVG, not .jpg") as raised:
        export_chart(recorded_run(), tmp_path / "speed.jpg")
    assert ".png or .svg" in raised.value.hint
    assert not list(tmp_path.iterdir())


def test_chart_export_without_matplotlib_says_which_extra_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # how Python marks a module as not importable
    with pytest.raises(PocketError, match="needs matplotlib") as raised:
        export_chart(recorded_run(), tmp_path / "speed.png")
    assert "pip install 'pocketlm[charts]'" in raised.value.hint


# The screen ----------------------------------------------------------------------------------------------------


async def answer_dialog(pilot, path: Path) -> None:  # type: ignore[no-untyped-def]
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, TextPromptDialog))
    pilot.app.screen.query_one("#answer", Input).value = str(path)
    await pilot.press("enter")


async def test_a_past_run_shows_again_and_exports_its_chart_and_table(store_with_starter: ModelStore, tmp_path: Path) -> None:
    saved = save_recorded_run()
    app = PocketApp(load_options=LoadOptions(context_length=2048))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_bench(pilot)
        runs = screen.query_one("#bench-runs", DataTable)
        assert runs.row_count == 1
        screen.query_one(TabbedContent).active = "bench-past"
        await pilot.pause()
        runs.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.run is not None)
        assert screen.run == saved and screen.query_one(TabbedContent).active == "bench-results"
        table = screen.query_one("#bench-table", DataTable)
        assert table.row_count == 4
        assert [str(c.label) for c in table.columns.values()][4:8] == ["pp64 t/s", "pp64 engine", "tg16 t/s", "tg16 engine"]
        assert str(table.get_row_at(0)[4]) == "810.0 ± 10.0"  # the mean ± sd of the recorded repetitions
        assert str(table.get_row_at(0)[7]) == "64.0" and str(table.get_row_at(2)[7]) == "—"  # llama.cpp's own figure; torch has none
        assert "stopped while loading" in str(table.get_row_at(3)[-1])
        assert screen.query_one("#bench-quality-chart").display  # perplexity was measured: the scatter is shown

        for button, name in (("#bench-export-table", "run.md"), ("#bench-export-chart", "run.png"), ("#bench-export-chart", "run.svg")):
            await pilot.click(button)
            await answer_dialog(pilot, tmp_path / name)
            await wait_for(pilot, lambda: screen.last_export == tmp_path / name, timeout=60)
        markdown = (tmp_path / "run.md").read_text()
        assert markdown.splitlines()[0].startswith("| model |") and "| SmolLM2:Q4_1 | llama.cpp |" in markdown
        assert (tmp_path / "run.png").read_bytes().startswith(PNG_SIGNATURE)
        assert ElementTree.parse(tmp_path / "run.svg").getroot().tag.endswith("svg")
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("run")) == ["run.md", "run.png", "run.svg"]

        await pilot.click("#bench-export-chart")
        await answer_dialog(pilot, tmp_path / "run.gif")
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications))
        assert "PNG or SVG" in next(n.message for n in app._notifications if n.severity == "error")


async def choose_starter_on_llama_cpp(screen: BenchScreen, pilot, n_prompt: int, n_gen: int, repetitions: int) -> None:  # type: ignore[no-untyped-def]
    screen.query_one(TabbedContent).active = "bench-setup"
    await pilot.pause()
    screen.picker.choose(models=[STARTER.name], backends=["llama.cpp"])
    screen.picker.set_settings(n_prompt, n_gen, repetitions)
    await pilot.pause()


async def test_bench_the_starter_model_on_llama_cpp_and_see_its_results(store_with_starter: ModelStore) -> None:
    app = PocketApp(load_options=LoadOptions(context_length=2048))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_bench(pilot)
        await choose_starter_on_llama_cpp(screen, pilot, n_prompt=16, n_gen=4, repetitions=2)
        await pilot.click("#bench-start")
        assert screen.running and screen.query_one("#bench-progress").display
        await wait_for(pilot, lambda: not screen.running, timeout=300)
        assert not [n.message for n in app._notifications if n.severity == "error"]
        run = screen.run
        assert run is not None and run.id is not None and run.request.settings == SpeedSettings(16, 4, 2)
        (result,) = run.results
        assert (result.cell.model, result.cell.backend, result.error) == (STARTER.name, "llama.cpp", "")
        assert result.speed is not None and len(result.speed.samples) == 2
        for spread in (result.speed.prompt_speed(), result.speed.generation_speed(), result.speed.time_to_first_token()):
            assert spread is not None and spread.mean > 0 and spread.sd >= 0
        assert screen.query_one("#bench-table", DataTable).row_count == 1
        assert screen.query_one("#bench-runs", DataTable).row_count == 1  # saved, and listed in Past runs
        assert not screen.query_one("#bench-quality-chart").display  # no perplexity asked for: no scatter
        assert not screen.query_one("#bench-export-chart").disabled


async def test_cancel_stops_a_running_bench_and_its_child_process(store_with_starter: ModelStore) -> None:
    app = PocketApp(load_options=LoadOptions(context_length=2048))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_bench(pilot)
        await choose_starter_on_llama_cpp(screen, pilot, n_prompt=256, n_gen=64, repetitions=50)  # minutes, unless cancelled
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: bool(bench_children()), timeout=60)
        await pilot.press("ctrl+x")
        await wait_for(pilot, lambda: not screen.running, timeout=60)
        (notice,) = [n for n in app._notifications if n.title == "Bench cancelled"]
        assert notice.severity == "warning" and "cancelled" in notice.message
        assert not bench_children()
        assert not screen.query_one("#bench-start").disabled  # ready for another run


async def test_run_without_a_model_chosen_says_to_choose_one_and_starts_nothing(store_with_starter: ModelStore) -> None:
    app = PocketApp(load_options=LoadOptions(context_length=2048))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_bench(pilot)
        await pilot.click("#bench-start")
        await wait_for(pilot, lambda: bool(app._notifications))
        (notice,) = list(app._notifications)
        assert notice.severity == "error" and notice.message.startswith("No model is chosen.")
        assert not screen.running and not bench_children()


async def test_a_run_without_pp_and_with_an_infinite_perplexity_shows_without_a_pp_column_or_a_crash(store_with_starter: ModelStore) -> None:
    recorded = recorded_run()
    no_pp = SpeedSettings(0, 16, 3)
    results = tuple(replace(r, speed=replace(r.speed, settings=no_pp, samples=tuple(replace(s, prompt_tokens_per_second=None,
                    time_to_first_token_s=None, engine_prompt_tokens_per_second=None) for s in r.speed.samples))) if r.speed else r
                    for r in recorded.results)  # fmt: skip
    results = (replace(results[0], perplexity=Perplexity(math.inf, 500, 2)), *results[1:])
    run = replace(recorded, request=replace(recorded.request, settings=no_pp), results=results)
    app = PocketApp(load_options=LoadOptions(context_length=2048))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_bench(pilot)
        screen.show_run(run)
        await pilot.pause()
        table = screen.query_one("#bench-table", DataTable)
        titles = [str(c.label) for c in table.columns.values()]
        assert not any(title.startswith("pp") for title in titles) and "tg16 t/s" in titles
        assert str(table.get_row_at(0)[titles.index("PPL")]) == "∞"
        assert screen.query_one("#bench-quality-chart").display  # the finite points are still plotted
        assert not [n for n in app._notifications if n.severity == "error"]


async def test_the_threads_input_sets_the_requests_threads_and_refuses_zero(store_with_starter: ModelStore) -> None:
    app = PocketApp(load_options=LoadOptions(context_length=2048))
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_bench(pilot)
        screen.picker.choose(models=[STARTER.name])
        await pilot.pause()
        assert screen.picker.request().threads is None  # empty: the physical cores, as without --threads
        screen.query_one("#bench-threads", Input).value = "3"
        assert screen.picker.request().threads == 3
        screen.query_one("#bench-threads", Input).value = "0"
        with pytest.raises(PocketError, match="--threads takes a whole number of at least 1"):
            screen.picker.request()
