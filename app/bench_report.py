"""A benchmark run as JSON, CSV, Markdown or a rich table.

JSON and CSV hold one record per cell and test (pp, then tg), under llama-bench's field names where they apply
(`n_prompt`, `n_gen`, `avg_ts`, `stddev_ts`, `samples_ts`, …), so tools written for llama-bench's `-o json` read ours;
the fields it lacks (load time, time to first token, peak memory, perplexity, …) follow under our own names.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from pocketlm.app.bench_records import BenchResult, BenchRun
from pocketlm.models.fit import human_bytes

if TYPE_CHECKING:
    from rich.table import Table

    from pocketlm.backends.speed import Spread

# Every record has these fields, in this order (CSV's columns).
FIELDS = (
    # llama-bench's
    "cpu_info", "gpu_info", "backends", "model_filename", "model_type", "model_size", "model_n_params", "n_threads",
    "n_prompt", "n_gen", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts",
    # pocketlm's
    "run_id", "test", "model", "backend", "format", "device", "load_s", "ttft_ms", "peak_memory_bytes", "peak_gpu_bytes",
    "perplexity", "perplexity_tokens", "prompt_digest", "engine_avg_ts", "engine_stddev_ts", "repetitions", "error",
    "perplexity_error",
)  # fmt: skip
_NONE = "—"


def test_label(kind: str, n: int) -> str:
    """llama-bench's name for a test: "pp512", "tg128"."""
    return f"{kind}{n}"


test_label.__test__ = False  # type: ignore[attr-defined]  # a test module importing it must not have pytest collect it


def records(run: BenchRun) -> list[dict[str, Any]]:
    """One record per cell and test (pp then tg); a failed cell is one record with its error and no figures."""
    rows = []
    for result in run.results:
        tests = _tests(run, result)
        if result.speed is None or not tests:
            rows.append(_record(run, result, "", 0, 0))
            continue
        rows += [_record(run, result, kind, n_prompt, n_gen) for kind, n_prompt, n_gen in tests]
    return rows


def to_json(run: BenchRun) -> str:
    """The records as JSON; a figure that is not a number (a perplexity of inf: a token the model gave no chance) is
    null, as JSON has no infinity and strict readers refuse Python's `Infinity`."""
    return json.dumps([_finite_or_none(record) for record in records(run)], indent=2, allow_nan=False)


def to_csv(run: BenchRun) -> str:
    """The JSON's records, one row each; a list of samples as its values joined by ";" (as llama-bench's CSV)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in map(_finite_or_none, records(run)):
        writer.writerow({key: ";".join(map(str, value)) if isinstance(value, list) else "" if value is None else value for key, value in record.items()})
    return buffer.getvalue()


def columns(run: BenchRun) -> list[str]:
    """The table's column titles: the tests that ran take their llama-bench names, each followed by the engine's own
    figure for it when a cell has one (llama.cpp's count, without pocketlm's Python around it)."""
    settings = run.request.settings
    tests = []
    for kind, n, engine in (("pp", settings.n_prompt, _engine_prompt), ("tg", settings.n_gen, _engine_generation)):
        if n > 0:
            tests.append(f"{test_label(kind, n)} t/s")
            if any(engine(result) is not None for result in run.results):
                tests.append(f"{test_label(kind, n)} engine")
    return ["model", "backend", "format", "size", *tests, "TTFT", "peak mem", "load", "PPL"]


def cell_values(run: BenchRun, result: BenchResult) -> dict[str, str]:
    """A cell's text under each of columns(run), "—" for what it did not measure (a failed cell: every figure)."""
    cell, speed = result.cell, result.speed
    values = dict.fromkeys(columns(run), _NONE)
    values.update(model=cell.model, backend=cell.backend, format=cell.format + (f" {cell.quantization}" if cell.quantization else ""),
                  size=human_bytes(cell.size_bytes))  # fmt: skip
    if result.failed or speed is None:
        return values
    settings = run.request.settings
    for kind, n, ours, engine in (("pp", settings.n_prompt, speed.prompt_speed(), _engine_prompt(result)),
                                  ("tg", settings.n_gen, speed.generation_speed(), _engine_generation(result))):  # fmt: skip
        values[f"{test_label(kind, n)} t/s"] = spread_text(ours)
        if f"{test_label(kind, n)} engine" in values:
            values[f"{test_label(kind, n)} engine"] = f"{engine.mean:.1f}" if engine else _NONE
    ttft = speed.time_to_first_token()
    values.update({"TTFT": _milliseconds(ttft.mean) if ttft else _NONE, "peak mem": human_bytes(result.peak_memory_bytes),
                   "load": f"{result.load_s:.1f} s", "PPL": perplexity_text(result.perplexity.value) if result.perplexity else _NONE})  # fmt: skip
    return {title: values[title] for title in columns(run)}


def cell_note(result: BenchResult) -> str:
    """Why a cell, or its perplexity, has no figures: "" when it has them all."""
    if result.failed:
        return result.error or "failed"
    return f"perplexity failed: {result.perplexity_error}" if result.perplexity_error else ""


def rows(run: BenchRun) -> list[list[str]]:
    """Each cell's row for the table, as text; a failed cell has its sentence where its first figure would be, and a
    failed perplexity its own in the PPL column."""
    table = []
    titles = columns(run)
    for result in run.results:
        values = cell_values(run, result)
        if result.failed:
            values[titles[4]] = f"failed: {cell_note(result)}"
        elif result.perplexity_error:
            values["PPL"] = f"failed: {result.perplexity_error}"
        table.append([values[title] for title in titles])
    return table


def perplexity_text(value: float) -> str:
    """A perplexity as the tables show it: "9.87"; infinite when the text held a token the model gave no chance."""
    if math.isnan(value):
        return "NaN"
    return "∞" if math.isinf(value) else f"{value:.2f}"


def spread_text(spread: Spread | None) -> str:
    """A speed over the repetitions: "123.4 ± 5.6" (mean ± sample sd), "—" when not measured."""
    return f"{spread.mean:.1f} ± {spread.sd:.1f}" if spread else _NONE


def system_line(run: BenchRun) -> str:
    settings = run.request.settings
    when = datetime.fromtimestamp(run.started_at).strftime("%Y-%m-%d %H:%M")
    number = f"run #{run.id}, " if run.id is not None else ""
    return f"{number}{when}, -p {settings.n_prompt} -n {settings.n_gen} -r {settings.repetitions}: {run.system.summary()}"


def to_markdown(run: BenchRun) -> str:
    """A GitHub-style table of the cells, then a line naming the machine and the settings."""
    lines = [markdown_row(columns(run)), markdown_row(["---"] * len(columns(run)))]
    lines += [markdown_row(row) for row in rows(run)]
    return "\n".join(lines) + f"\n\n{system_line(run)}\n"


def results_table(run: BenchRun) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=None, caption=Text(system_line(run)), caption_justify="left")
    for index, title in enumerate(columns(run)):
        # A failed cell's sentence sits in the first figure's column (a failed perplexity's in PPL's): folded there
        # rather than widening the table.
        table.add_column(title, justify="left" if index < 4 else "right", overflow="fold", max_width=48 if index == 4 or title == "PPL" else None)
    for result, row in zip(run.results, rows(run), strict=True):
        # Text, not str: names are the user's, and rich would read `a[/]b` as markup.
        table.add_row(*(Text(value, justify="left" if result.failed else None) for value in row), style="red" if result.failed else None)
    return table


def best_generation_result(run: BenchRun) -> BenchResult | None:
    """The cell of the fastest mean generation (the first of equals), None when no cell measured generation."""
    measured = [r for r in run.results if r.speed is not None and r.speed.generation_speed() is not None]
    return max(measured, key=lambda r: r.speed.generation_speed().mean) if measured else None  # type: ignore[union-attr]


def best_generation_speed(run: BenchRun) -> float | None:
    """The fastest cell's mean generation tokens/s: the history listing's one figure per run."""
    best = best_generation_result(run)
    return best.speed.generation_speed().mean if best else None  # type: ignore[union-attr]


def _tests(run: BenchRun, result: BenchResult) -> list[tuple[str, int, int]]:
    settings = result.speed.settings if result.speed else run.request.settings
    return [("pp", settings.n_prompt, 0)] * (settings.n_prompt > 0) + [("tg", 0, settings.n_gen)] * (settings.n_gen > 0)


def _record(run: BenchRun, result: BenchResult, kind: str, n_prompt: int, n_gen: int) -> dict[str, Any]:
    cell, speed = result.cell, result.speed
    record: dict[str, Any] = dict.fromkeys(FIELDS)
    record.update(
        cpu_info=run.system.cpu, gpu_info=run.system.gpu, backends=cell.backend, model_filename=str(cell.path), model_type=cell.quantization,
        model_size=cell.size_bytes, model_n_params=cell.parameter_count, n_threads=result.threads, n_prompt=n_prompt, n_gen=n_gen,
        test_time=datetime.fromtimestamp(run.started_at, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        run_id=run.id, test=test_label(kind, n_prompt or n_gen) if kind else "", model=cell.model, backend=cell.backend,
        format=cell.format, device=result.device, load_s=result.load_s, peak_memory_bytes=result.peak_memory_bytes,
        peak_gpu_bytes=result.peak_gpu_bytes, perplexity=result.perplexity.value if result.perplexity else None,
        perplexity_tokens=result.perplexity.scored_tokens if result.perplexity else None, error=result.error,
        perplexity_error=result.perplexity_error,
        prompt_digest=speed.prompt_digest if speed else None, repetitions=len(speed.samples) if speed else 0,
    )  # fmt: skip
    if speed is None or not kind:
        return record
    # The samples the table's mean ± sd is computed from (SpeedResult's), so that avg_ts is the table's figure.
    if kind == "pp":
        samples_ts = [s.prompt_tokens_per_second for s in speed.samples if s.prompt_tokens_per_second is not None]
        engine = speed.engine_prompt_speed()
        ttft = speed.time_to_first_token()
        record["ttft_ms"] = ttft.mean * 1000 if ttft else None
    else:
        samples_ts = [s.tokens_per_second for s in speed.samples if s.tokens_per_second is not None]
        engine = speed.engine_generation_speed()
    # llama-bench times each run whole (ns) and derives t/s per run; ours come as t/s, and a run's time is its
    # tokens over its speed (a run too short for the clock to see, 0 t/s, has no time to give).
    samples_ns = [round((n_prompt or n_gen) / ts * 1e9) for ts in samples_ts if ts > 0]
    record.update(_spread_fields("ts", samples_ts), samples_ts=samples_ts, samples_ns=samples_ns, **_spread_fields("ns", samples_ns))
    record.update(engine_avg_ts=engine.mean if engine else None, engine_stddev_ts=engine.sd if engine else None)
    return record


def _spread_fields(unit: str, values: list[float] | list[int]) -> dict[str, float | None]:
    from pocketlm.backends.speed import Spread

    spread = Spread.of(values)
    if spread is None:
        return {f"avg_{unit}": None, f"stddev_{unit}": None}
    if unit == "ns":  # llama-bench writes nanoseconds as integers
        return {"avg_ns": round(spread.mean), "stddev_ns": round(spread.sd)}
    return {"avg_ts": spread.mean, "stddev_ts": spread.sd}


def _milliseconds(seconds: float) -> str:
    milliseconds = seconds * 1000
    return f"{milliseconds:.1f} ms" if milliseconds < 10 else f"{milliseconds:.0f} ms"


def _engine_prompt(result: BenchResult) -> Spread | None:
    return result.speed.engine_prompt_speed() if result.speed else None


def _engine_generation(result: BenchResult) -> Spread | None:
    return result.speed.engine_generation_speed() if result.speed else None


def _finite_or_none(value: Any) -> Any:
    """`value` with every float that is not a finite number (inf, NaN) replaced by None, in lists and dicts too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    return value


def markdown_row(values: list[str]) -> str:
    """A row of a GitHub-style table, its cells escaped."""
    # A | inside a cell would end it early; a newline would end the row.
    return "| " + " | ".join(value.replace("|", "\\|").replace("\n", " ") for value in values) + " |"
