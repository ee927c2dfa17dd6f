"""`pocketlm bench` as a user runs it: real models through real backends, each cell in its own process, every run
kept in the history. Speeds are never asserted (they depend on the machine and its load): only that they were
measured, over the repetitions asked for, and reported under llama-bench's names."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pocketlm.app.bench_run import BenchRequest, family_of, plan_bench, plan_cells
from pocketlm.models.errors import BackendUnavailable
from pocketlm.models.store import LocalModel, ModelStore
from tests.app.test_bench_report import markdown_table
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.backends.tiny_gguf import tiny_llama_gguf_path
from tests.fixtures import pocketlm_executable

REPO = Path(__file__).resolve().parent.parent.parent
TINY = ("-p", "16", "-n", "8", "-r", "2")  # tiny tests: the figures are checked, not their size


def bench(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return pocketlm("bench", *args, home=home)


def cell_processes(parent_pid: int) -> list[psutil.Process]:
    """The bench's child processes measuring a cell, once there is one (waited for: the parent starts it when it can)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cells = []
        for child in psutil.Process(parent_pid).children(recursive=True):
            try:
                if "pocketlm.app.bench_cell" in " ".join(child.cmdline()):
                    cells.append(child)
            except psutil.NoSuchProcess:
                continue
        if cells:
            return cells
        time.sleep(0.05)
    raise AssertionError("no cell process started within 120 s")


def test_the_starter_model_on_llama_cpp_gives_llama_bench_records_and_a_run_in_the_history(store_with_starter: ModelStore, pocket_home: Path) -> None:
    result = bench("SmolLM2", *TINY, "--json", home=pocket_home)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)  # stdout holds the JSON alone: progress went to stderr
    assert [(r["test"], r["n_prompt"], r["n_gen"]) for r in records] == [("pp16", 16, 0), ("tg8", 0, 8)]
    for record in records:
        assert record["backend"] == "llama.cpp" and record["error"] == "" and record["model"] == "SmolLM2-135M-Instruct"
        assert len(record["samples_ts"]) == 2 and all(ts > 0 for ts in record["samples_ts"])
        # The spread is over the repetitions: mean and sample standard deviation, as llama-bench's avg_ts/stddev_ts.
        assert math.isclose(record["avg_ts"], statistics.fmean(record["samples_ts"]))
        assert math.isclose(record["stddev_ts"], statistics.stdev(record["samples_ts"]))
        assert record["load_s"] > 0 and record["peak_memory_bytes"] > 50_000_000 and record["n_threads"] >= 1
        assert record["model_size"] == store_with_starter.get("SmolLM2-135M-Instruct").size_bytes  # type: ignore[union-attr]
        assert record["engine_avg_ts"] > 0  # llama.cpp's own count beside ours
    assert records[0]["ttft_ms"] > 0 and len(records[0]["prompt_digest"]) == 16
    assert "✓ SmolLM2-135M-Instruct on llama.cpp" in result.stderr and "Saved as run 1" in result.stderr

    listing = bench("--history", home=pocket_home)
    assert listing.returncode == 0, listing.stderr
    assert "SmolLM2-135M-Instruct" in listing.stdout and "llama.cpp" in listing.stdout
    again = bench("--history", "1", "--json", home=pocket_home)
    assert again.returncode == 0 and json.loads(again.stdout) == records
    header, _, row = markdown_table(bench("--history", "1", "--md", home=pocket_home).stdout)
    assert header[4:8] == ["pp16 t/s", "pp16 engine", "tg8 t/s", "tg8 engine"] and row[0] == "SmolLM2-135M-Instruct" and "±" in row[6]
    assert float(row[7]) > 0  # llama.cpp's own tg figure beside ours
    # The listing of runs honours the chosen format too.
    listed = list(csv.DictReader(io.StringIO(bench("--history", "--csv", home=pocket_home).stdout)))
    assert [(r["id"], r["models"], r["backends"]) for r in listed] == [("1", "SmolLM2-135M-Instruct", "llama.cpp")] and float(listed[0]["best_tg_ts"]) > 0
    header, _, row = markdown_table(bench("--history", "--md", home=pocket_home).stdout)
    assert header == ["id", "date", "models", "backends", "best tg t/s"] and row[0] == "1"


def test_llama_cpp_and_torch_measure_the_same_prompt_tokens_and_score_the_same_text(
    store_with_starter: ModelStore, starter_checkpoint: Path, pocket_home: Path, tmp_path: Path
) -> None:
    from pocketlm.converters.calibration import HELD_OUT_TEXT

    store_with_starter.register(starter_checkpoint, source="import:checkpoint", name="smol-hf")
    text = tmp_path / "text.txt"
    text.write_text(HELD_OUT_TEXT)
    result = bench("SmolLM2-135M-Instruct", "smol-hf", "--backend", "llama.cpp,torch", *TINY, "--ppl", str(text), "--json", home=pocket_home)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(r["model"], r["backend"], r["test"]) for r in records] == [
        ("SmolLM2-135M-Instruct", "llama.cpp", "pp16"), ("SmolLM2-135M-Instruct", "llama.cpp", "tg8"),
        ("smol-hf", "torch", "pp16"), ("smol-hf", "torch", "tg8"),
    ]  # fmt: skip
    assert all(r["avg_ts"] > 0 and len(r["samples_ts"]) == 2 for r in records)
    assert records[2]["format"] == "safetensors" and records[2]["engine_avg_ts"] is None  # torch keeps no engine count
    # The same tokenizer gives every backend the very same prompt ids.
    assert records[0]["prompt_digest"] == records[2]["prompt_digest"]
    llama_ppl, torch_ppl = records[0]["perplexity"], records[2]["perplexity"]
    assert records[0]["perplexity_tokens"] == records[2]["perplexity_tokens"] > 100
    # The checkpoint is the GGUF's Q4_1 weights dequantized: the two compute the same model, and llama.cpp's only
    # difference (8-bit activations in its Q4_1 matrix products) moves perplexity by well under 1% (0.3% measured).
    assert 1 < llama_ppl and abs(llama_ppl / torch_ppl - 1) < 0.02


def test_a_damaged_model_is_a_row_with_its_sentence_and_the_other_cells_still_run(store_with_starter: ModelStore, starter_gguf: Path,
                                                                                  pocket_home: Path, tmp_path: Path) -> None:  # fmt: skip
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(starter_gguf.read_bytes())
    store_with_starter.register(damaged, source="import:damaged", name="damaged")
    with damaged.open("r+b") as file:  # damaged on disk after it was registered: found only when a backend opens it
        file.truncate(50_000_000)
    result = bench("damaged", "SmolLM2-135M-Instruct", *TINY, "--md", home=pocket_home)
    assert result.returncode == 0, result.stderr
    header, _, broken, working = markdown_table(result.stdout)
    failure = dict(zip(header, broken))["pp16 t/s"]
    assert failure.startswith("failed: damaged.gguf is truncated") and "Traceback" not in result.stderr
    assert "±" in dict(zip(header, working))["tg8 t/s"]

    alone = bench("damaged", *TINY, home=pocket_home)  # every cell failed: exit 1, the table still says why
    assert alone.returncode == 1 and "damaged.gguf is truncated" in alone.stdout and "Traceback" not in alone.stderr


def test_a_perplexity_that_cannot_be_measured_keeps_the_speed_and_says_why(store_with_starter: ModelStore, pocket_home: Path) -> None:
    one_token = pocket_home / "one-token.txt"
    one_token.write_text("Hi", encoding="utf-8")
    result = bench("SmolLM2", *TINY, "--ppl", str(one_token), "--json", home=pocket_home)
    assert result.returncode == 0, result.stderr
    for record in json.loads(result.stdout):
        assert record["error"] == "" and len(record["samples_ts"]) == 2, "the speed stands"
        assert record["perplexity"] is None and record["perplexity_error"], "the row says why perplexity is missing"


def test_a_cell_whose_engine_aborts_is_a_sentence_not_a_dead_bench(store_with_starter: ModelStore, pocket_home: Path) -> None:
    from pocketlm.app.bench_run import CELL_MODULE_ENV

    seam = {**os.environ, "POCKETLM_HOME": str(pocket_home), CELL_MODULE_ENV: "tests.app.bench_abort_child", "PYTHONPATH": str(REPO)}
    result = subprocess.run([pocketlm_executable(), "bench", "SmolLM2", *TINY, "--md"], capture_output=True, text=True, timeout=120, env=seam)
    assert result.returncode == 1 and "Traceback" not in result.stderr  # the only cell failed
    header, _, row = markdown_table(result.stdout)
    assert dict(zip(header, row))["pp16 t/s"] == (
        "failed: llama.cpp crashed while measuring SmolLM2-135M-Instruct (signal SIGABRT: llama-model.cpp:812: GGML_ASSERT(n_embd > 0) failed); the file may be damaged."
    )


def test_a_family_is_the_model_and_what_was_made_from_it_without_adapters(model_store: ModelStore, starter_gguf: Path, tmp_path: Path) -> None:
    tiny = tiny_llama_gguf_path()
    source = model_store.register(starter_gguf, source="import:source", name="source")
    model_store.register(tiny, source="convert", name="source-q", parent="source", lineage="quantize Q4_1")
    model_store.register(tiny, source="convert", name="source-q-again", parent="source-q", lineage="quantize Q2_K")
    model_store.add(LocalModel(name="source-lora", path=tmp_path / "lora", format="peft-lora", architecture="llama", parameter_count=0,
                               quantization="", context_length=0, size_bytes=1, source="import:lora", parent="source"))  # fmt: skip
    model_store.register(tiny, source="import:other", name="unrelated")

    assert [m.name for m in family_of(model_store, source)] == ["source", "source-q", "source-q-again"]
    cells = plan_cells(model_store, BenchRequest(models=(), family="source"))
    assert [(c.model, c.backend) for c in cells] == [("source", "llama.cpp"), ("source-q", "llama.cpp"), ("source-q-again", "llama.cpp")]
    # Named twice (outright and in the family), a model is measured once.
    assert len(plan_cells(model_store, BenchRequest(models=("source-q",), family="source"))) == 3


def unloadable_member(store: ModelStore, tmp_path: Path, parent: str) -> LocalModel:
    """A family member in a format no installed backend loads (as an MLX model on Linux without mlx would be)."""
    return store.add(LocalModel(name=f"{parent}-onnx", path=tmp_path / "model.onnx", format="onnx", architecture="llama", parameter_count=1,
                                quantization="", context_length=2048, size_bytes=1, source="convert", parent=parent))  # fmt: skip


def test_a_family_member_no_installed_backend_loads_is_left_out_and_named_outright_refused(model_store: ModelStore, starter_gguf: Path,
                                                                                          tmp_path: Path) -> None:  # fmt: skip
    model_store.register(starter_gguf, source="import:source", name="source")
    unloadable_member(model_store, tmp_path, "source")
    plan = plan_bench(model_store, BenchRequest(models=(), family="source"))
    assert [(c.model, c.backend) for c in plan.cells] == [("source", "llama.cpp")]
    assert plan.skipped == ("source-onnx is left out: no backend loads onnx models.",)
    with pytest.raises(BackendUnavailable):
        plan_bench(model_store, BenchRequest(models=("source-onnx",), family="source"))


def test_a_family_bench_runs_each_member(model_store: ModelStore, starter_gguf: Path, pocket_home: Path, tmp_path: Path) -> None:
    model_store.register(starter_gguf, source="import:source", name="source")
    model_store.register(tiny_llama_gguf_path(), source="convert", name="source-small", parent="source", lineage="quantize Q4_1")
    unloadable_member(model_store, tmp_path, "source-small")
    result = bench("--family", "source", "-p", "8", "-n", "4", "-r", "1", "--csv", home=pocket_home)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["model"], row["test"]) for row in rows] == [("source", "pp8"), ("source", "tg4"), ("source-small", "pp8"), ("source-small", "tg4")]
    assert "source-small-onnx is left out: no backend loads onnx models." in result.stderr  # said, not silently dropped


def test_what_cannot_be_benched_is_refused_with_a_sentence(store_with_starter: ModelStore, pocket_home: Path) -> None:
    assert_clean_failure(bench("SmolLM2", "--backend", "vulkan", home=pocket_home), "No backend is named 'vulkan'.")
    assert_clean_failure(bench("SmolLM2", "--backend", "torch", home=pocket_home),
                         "SmolLM2-135M-Instruct is a gguf model, which torch cannot load.")  # fmt: skip
    assert_clean_failure(bench("nothing-like-it", home=pocket_home), "No model named 'nothing-like-it'")
    assert_clean_failure(bench("SmolLM2", "--ppl", str(pocket_home / "missing.txt"), home=pocket_home), "missing.txt does not exist.")
    assert_clean_failure(bench("SmolLM2", "-p", "0", "-n", "0", home=pocket_home), "A speed test needs a prompt or a generation length")
    assert_clean_failure(bench("--history", "42", home=pocket_home), "There is no benchmark run 42.")
    usage = bench(home=pocket_home)
    assert usage.returncode == 2 and "Name one or more models" in usage.stderr


def test_ctrl_c_keeps_the_finished_cells_and_leaves_no_child_behind(store_with_starter: ModelStore, pocket_home: Path) -> None:
    store_with_starter.register(tiny_llama_gguf_path(), source="import:tiny", name="a-tiny")
    # The tiny model's cell takes a second; the starter's, with these lengths, tens of seconds: Ctrl-C lands in it.
    command = [pocketlm_executable(), "bench", "a-tiny", "SmolLM2-135M-Instruct", "-p", "64", "-n", "64", "-r", "30"]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "POCKETLM_HOME": str(pocket_home)})
    assert parent.stderr is not None
    while (line := parent.stderr.readline()) and not line.startswith("✓ a-tiny"):
        pass
    children = cell_processes(parent.pid)  # the first cell's child has ended by now: these measure the second
    parent.send_signal(signal.SIGINT)
    stdout, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 1, stderr
    assert "The benchmark was cancelled; the 1 finished cells are saved." in stderr and "Traceback" not in stderr
    assert "a-tiny" in stdout and "SmolLM2-135M-Instruct" not in stdout
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    saved = json.loads(bench("--history", "1", "--json", home=pocket_home).stdout)
    assert {record["model"] for record in saved} == {"a-tiny"}


def test_a_cell_whose_parent_is_killed_ends_too(store_with_starter: ModelStore, pocket_home: Path) -> None:
    command = [pocketlm_executable(), "bench", "SmolLM2-135M-Instruct", "-p", "64", "-n", "64", "-r", "30"]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "POCKETLM_HOME": str(pocket_home)})
    children = cell_processes(parent.pid)
    parent.kill()  # kill -9: no handler runs; the child sees its stdin end
    parent.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive

