"""A benchmark run as JSON, CSV and Markdown (each parsed back), as a rich table, and the machine recorded with it."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rich.console import Console

from pocketlm.app.bench_report import FIELDS, results_table, test_label, to_csv, to_json, to_markdown
from pocketlm.app.bench_series import quality_points
from pocketlm.app.bench_run import BenchCell, BenchRequest, BenchResult, BenchRun
from pocketlm.app.system_info import SystemInfo, collect_system_info, gpu_named_in
from pocketlm.backends.perplexity import Perplexity
from pocketlm.backends.speed import SpeedResult, SpeedSample, SpeedSettings

# llama-bench's `-o json` fields that a record of ours carries under the same name and meaning.
LLAMA_BENCH_FIELDS = ("model_filename", "model_type", "model_size", "model_n_params", "backends", "n_threads", "n_prompt", "n_gen",
                      "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ts", "samples_ns", "test_time", "cpu_info", "gpu_info")  # fmt: skip
SYSTEM = SystemInfo(machine="x86_64", os="Linux 6.1.0 (Debian GNU/Linux 12 (bookworm))", cpu="AMD EPYC 7B13", physical_cores=2,
                    logical_cores=2, memory_bytes=24 * 2**30, gpu="", libraries=(("pocketlm", "0.1.0"), ("llama-cpp-python", "0.3.36")))  # fmt: skip


def cell(model: str, backend: str, model_format: str = "gguf", quantization: str = "Q4_1") -> BenchCell:
    return BenchCell(model=model, path=Path(f"/models/{model}.gguf"), format=model_format, quantization=quantization,
                     size_bytes=98_400_000, parameter_count=134_515_008, backend=backend)  # fmt: skip


def measured(bench_cell: BenchCell, pp: list[float], tg: list[float], settings: SpeedSettings, ppl: float | None = None) -> BenchResult:
    """A cell's result as a run recorded it: repetitions' speeds (test data, as a past run left them), with the engine's
    own figures where the backend is llama.cpp (the one that reports them)."""
    engine = 1.0 if bench_cell.backend == "llama.cpp" else None
    samples = tuple(SpeedSample(prompt_tokens_per_second=p, tokens_per_second=t, time_to_first_token_s=settings.n_prompt / p + 0.002,
                                engine_prompt_tokens_per_second=engine and p * 1.01, engine_tokens_per_second=engine and t * 1.02)
                    for p, t in zip(pp, tg))  # fmt: skip
    return BenchResult(cell=bench_cell, speed=SpeedResult(settings, samples, "0f3c9a2b71d4e866"), load_s=0.41, peak_memory_bytes=312_000_000,
                       peak_gpu_bytes=None, perplexity=Perplexity(ppl, 760, 3) if ppl else None, threads=2, device="CPU")  # fmt: skip


def sample_run(settings: SpeedSettings = SpeedSettings(n_prompt=512, n_gen=128, repetitions=3), run_id: int | None = 7) -> BenchRun:
    """Two measured cells and a failed one, as a run on this machine recorded them."""
    results = (
        measured(cell("SmolLM2-135M-Instruct", "llama.cpp"), [812.5, 799.0, 820.25], [61.5, 59.75, 62.0], settings, ppl=9.87),
        measured(cell("SmolLM2-135M-hf", "torch", "safetensors", ""), [402.0, 398.5, 405.0], [21.0, 20.5, 22.25], settings, ppl=9.61),
        BenchResult(cell=cell("broken", "llama.cpp"), speed=None, load_s=0.0, peak_memory_bytes=0, peak_gpu_bytes=None, perplexity=None,
                    threads=0, device="", error="broken.gguf is truncated: tensor blk.3.ffn_up.weight ends past the end of the file."),
    )  # fmt: skip
    request = BenchRequest(models=("SmolLM2", "SmolLM2-135M-hf", "broken"), settings=settings, threads=2)
    return BenchRun(id=run_id, started_at=1_760_000_000.0, system=SYSTEM, request=request, results=results)


def test_json_has_one_llama_bench_record_per_cell_and_test_pp_first() -> None:
    records = json.loads(to_json(sample_run()))
    assert [(r["model"], r["backend"], r["test"]) for r in records] == [
        ("SmolLM2-135M-Instruct", "llama.cpp", "pp512"), ("SmolLM2-135M-Instruct", "llama.cpp", "tg128"),
        ("SmolLM2-135M-hf", "torch", "pp512"), ("SmolLM2-135M-hf", "torch", "tg128"), ("broken", "llama.cpp", ""),
    ]  # fmt: skip
    assert all(set(LLAMA_BENCH_FIELDS) <= set(record) for record in records)
    pp, tg = records[0], records[1]
    # llama-bench's conventions: a pp record has n_gen 0 and a tg record n_prompt 0; the spread is the mean and the
    # sample standard deviation of the repetitions' t/s; a repetition's time is its tokens over its speed.
    assert (pp["n_prompt"], pp["n_gen"], tg["n_prompt"], tg["n_gen"]) == (512, 0, 0, 128)
    assert pp["samples_ts"] == [812.5, 799.0, 820.25]
    assert math.isclose(pp["avg_ts"], statistics.fmean(pp["samples_ts"])) and math.isclose(pp["stddev_ts"], statistics.stdev(pp["samples_ts"]))
    assert all(abs(ns - 128 / ts * 1e9) <= 1 for ns, ts in zip(tg["samples_ns"], tg["samples_ts"]))
    assert pp["avg_ns"] == round(statistics.fmean(pp["samples_ns"])) and isinstance(pp["stddev_ns"], int)
    assert (pp["model_type"], pp["model_size"], pp["n_threads"], pp["cpu_info"]) == ("Q4_1", 98_400_000, 2, "AMD EPYC 7B13")
    assert pp["ttft_ms"] > 0 and tg["ttft_ms"] is None
    assert pp["engine_avg_ts"] > pp["avg_ts"] and pp["perplexity"] == 9.87 and pp["prompt_digest"] == "0f3c9a2b71d4e866"
    assert pp["test_time"] == "2025-10-09T08:53:20Z" and pp["run_id"] == 7


def test_a_failed_cell_is_one_record_with_its_sentence_and_no_figures() -> None:
    failed = json.loads(to_json(sample_run()))[-1]
    assert failed["error"].startswith("broken.gguf is truncated")
    assert failed["avg_ts"] is None and failed["samples_ts"] is None and failed["repetitions"] == 0


def test_csv_holds_the_json_records_row_for_row() -> None:
    run = sample_run()
    rows = list(csv.DictReader(io.StringIO(to_csv(run))))
    records = json.loads(to_json(run))
    assert list(rows[0]) == list(FIELDS) and len(rows) == len(records)
    for row, record in zip(rows, records):
        assert (row["model"], row["backend"], row["test"], row["error"]) == (record["model"], record["backend"], record["test"], record["error"])
        if record["avg_ts"] is not None:
            assert math.isclose(float(row["avg_ts"]), record["avg_ts"])
            assert [float(value) for value in row["samples_ts"].split(";")] == record["samples_ts"]  # llama-bench's CSV joins with ;


def markdown_table(text: str) -> list[list[str]]:
    """The table's rows as cells, the | escaped inside a cell kept as a | (GitHub's reading)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[part.replace("\\|", "|").strip() for part in _split_row(line)] for line in lines]


def _split_row(line: str) -> list[str]:
    parts, current, escaped = [], "", False
    for character in line.strip()[1:-1]:
        if character == "|" and not escaped:
            parts.append(current)
            current = ""
        else:
            current += character
        escaped = character == "\\"
    return parts + [current]


def test_markdown_is_a_table_of_every_cell_then_the_machine() -> None:
    text = to_markdown(sample_run())
    header, rule, *cells = markdown_table(text)
    assert header == ["model", "backend", "format", "size", "pp512 t/s", "pp512 engine", "tg128 t/s", "tg128 engine", "TTFT", "peak mem", "load", "PPL"]
    assert set(rule) == {"---"} and len(cells) == 3 and all(len(row) == len(header) for row in cells)
    llama, torch = dict(zip(header, cells[0])), dict(zip(header, cells[1]))
    assert llama["tg128 t/s"] == "61.1 ± 1.2" and llama["PPL"] == "9.87" and llama["format"] == "gguf Q4_1"
    # llama.cpp's own count beside ours (the mean over the repetitions); torch has none.
    assert llama["tg128 engine"] == f"{statistics.fmean([61.5, 59.75, 62.0]) * 1.02:.1f}" and torch["tg128 engine"] == "—"
    assert llama["TTFT"] == f"{statistics.fmean([512 / p + 0.002 for p in (812.5, 799.0, 820.25)]) * 1000:.0f} ms"
    assert dict(zip(header, cells[2]))["pp512 t/s"].startswith("failed: broken.gguf is truncated")
    assert "run #7" in text and "AMD EPYC 7B13" in text and "-p 512 -n 128 -r 3" in text and "llama-cpp-python 0.3.36" in text


def test_a_skipped_test_has_no_column_and_no_records() -> None:
    run = sample_run(SpeedSettings(n_prompt=0, n_gen=16, repetitions=2))
    header = markdown_table(to_markdown(run))[0]
    assert "tg16 t/s" in header and not any(title.startswith("pp") for title in header)
    assert {record["test"] for record in json.loads(to_json(run))} == {"tg16", ""}


def test_a_pipe_in_a_model_name_does_not_break_the_markdown_row() -> None:
    run = sample_run()
    odd = BenchRun(run.id, run.started_at, run.system, run.request, (measured(cell("a|b[/]c", "llama.cpp"), [1.0], [2.0], run.request.settings),))
    header, _, row = markdown_table(to_markdown(odd))
    assert len(row) == len(header) and row[0] == "a|b[/]c"


def test_the_rich_table_shows_names_as_written() -> None:
    run = sample_run()
    odd = BenchRun(run.id, run.started_at, run.system, run.request, run.results + (measured(cell("evil[/]name", "llama.cpp"), [1.0], [2.0], run.request.settings),))
    console = Console(width=250, record=True)
    console.print(results_table(odd))
    shown = console.export_text()
    assert "evil[/]name" in shown and "SmolLM2-135M-hf" in shown and "failed: broken.gguf is truncated" in shown


def test_test_labels_are_llama_benchs() -> None:
    assert (test_label("pp", 512), test_label("tg", 128)) == ("pp512", "tg128")


def test_system_info_round_trips_and_tolerates_fields_it_does_not_know() -> None:
    assert SystemInfo.from_dict(SYSTEM.to_dict()) == SYSTEM
    assert SystemInfo.from_dict(json.loads(json.dumps({**SYSTEM.to_dict(), "npu": "future"}))) == SYSTEM


def test_this_machine_is_described_without_importing_an_engine() -> None:
    probe = (
        "import sys, json\nfrom pocketlm.app.system_info import collect_system_info\ninfo = collect_system_info()\n"
        "print(json.dumps([info.to_dict(), sorted(m for m in ('torch', 'mlx', 'llama_cpp', 'transformers', 'numpy') if m in sys.modules)]))"
    )
    info, imported = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert imported == []
    described = SystemInfo.from_dict(info)
    assert described == collect_system_info()
    assert described.physical_cores >= 1 and described.logical_cores >= described.physical_cores and described.memory_bytes > 2**28
    assert described.cpu and described.machine and described.os
    assert dict(described.libraries)["pocketlm"] and "llama-cpp-python" in dict(described.libraries)


def test_a_gpu_is_named_only_by_a_backend_that_runs_on_one() -> None:
    assert gpu_named_in(["CPU, GPU offload supported, 2 physical cores", "CPU (float32), 2 cores"]) == ""
    assert gpu_named_in(["CPU, 2 physical cores", "CUDA: NVIDIA H200, 139.8 GiB"]) == "CUDA: NVIDIA H200, 139.8 GiB"
    assert gpu_named_in(["Metal GPU (Apple M2, 16.0 GiB)"]) == "Metal GPU (Apple M2, 16.0 GiB)"


def with_perplexity(run: BenchRun, value: float) -> BenchRun:
    """`run` with its first cell's perplexity replaced by `value`."""
    first = replace(run.results[0], perplexity=Perplexity(value, 760, 3))
    return replace(run, results=(first, *run.results[1:]))


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_perplexity_that_is_not_a_number_is_null_in_json_and_csv_and_off_the_chart(value: float) -> None:
    run = with_perplexity(sample_run(), value)
    text = to_json(run)
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: a reader other than Python's accepts it
    assert [record["perplexity"] for record in json.loads(text)][:2] == [None, None]
    assert [row["perplexity"] for row in csv.DictReader(io.StringIO(to_csv(run)))][:2] == ["", ""]
    assert [point.label for point in quality_points(run)] == ["safetensors · torch"]  # a chart has no place for it
    header, _, first, *_ = markdown_table(to_markdown(run))
    assert dict(zip(header, first))["PPL"] == ("∞" if math.isinf(value) else "NaN")


def test_a_failed_perplexity_keeps_the_speed_and_says_why_in_the_row() -> None:
    run = sample_run()
    reason = "The perplexity text has 1 token; perplexity needs at least 2."
    run = replace(run, results=(replace(run.results[0], perplexity=None, perplexity_error=reason), *run.results[1:]))
    assert not run.results[0].failed
    header, _, first, *_ = markdown_table(to_markdown(run))
    row = dict(zip(header, first))
    assert "±" in row["tg128 t/s"] and row["PPL"] == f"failed: {reason}"
    records = json.loads(to_json(run))
    assert records[0]["perplexity_error"] == reason and records[0]["avg_ts"] is not None and records[0]["error"] == ""


def test_the_records_mean_is_the_tables_even_with_a_sample_of_zero() -> None:
    run = sample_run(SpeedSettings(n_prompt=512, n_gen=128, repetitions=3))
    speed = run.results[0].speed
    assert speed is not None
    zero = replace(speed.samples[0], tokens_per_second=0.0)  # a run too short for the clock: kept by Spread, so by samples_ts
    run = replace(run, results=(replace(run.results[0], speed=replace(speed, samples=(zero, *speed.samples[1:]))), *run.results[1:]))
    tg = json.loads(to_json(run))[1]
    assert tg["samples_ts"] == [0.0, 59.75, 62.0] and math.isclose(tg["avg_ts"], run.results[0].speed.generation_speed().mean)  # type: ignore[union-attr]
    assert len(tg["samples_ns"]) == 2  # a zero speed has no time to give


def test_a_run_with_no_engine_figures_has_no_engine_columns() -> None:
    run = sample_run()
    torch_only = replace(run, results=run.results[1:])
    assert not any("engine" in title for title in markdown_table(to_markdown(torch_only))[0])
