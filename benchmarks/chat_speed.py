"""Generation speed of pocketlm's llama.cpp backend against llama.cpp's own llama-bench (tg128), side by side.

    python benchmarks/chat_speed.py [--model PATH] [--llama-bench PATH/TO/llama-bench] [--threads N] [--repetitions 5]

Rows, measured in one run on the same file and thread count:
  llama-bench         llama.cpp's C++ tool, `-p 0 -n 128`, as you built it (optional)
  llama-bench, same   the same tool on the libraries llama-cpp-python compiled (LD_LIBRARY_PATH, Linux): the
                      reference, since it isolates the bindings' and pocketlm's cost from compiler flags
  llama-cpp-python    the bare `Llama.generate` loop, greedy: the bindings' own per-token cost
  pocketlm            `ChatModel.stream_chat`: template, detokenising, stop strings, events
Each measures 128 generated tokens after a warm-up, and reports mean ± sd of tokens/s over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pocketlm.backends.base import ChatMessage, GenerationStats, LoadOptions, SamplingParams
from pocketlm.backends.llamacpp import LlamaCppBackend
from pocketlm.models.fit import physical_cores
from pocketlm.models.locations import models_dir
from pocketlm.models.starter import STARTER, fetch_starter

TOKENS = 128


def pocketlm_rates(model_path: Path, threads: int, repetitions: int) -> list[float]:
    model = LlamaCppBackend().load(model_path, LoadOptions(context_length=512, threads=threads))
    sampling = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    messages = [ChatMessage("user", "Hi")]
    rates = []
    for repetition in range(repetitions + 1):
        stats = [e for e in model.stream_chat(messages, sampling) if isinstance(e, GenerationStats)][0]
        assert stats.generated_tokens == TOKENS
        if repetition:  # the first run is the warm-up
            rates.append(stats.tokens_per_second)
    model.close()
    return rates


def bare_binding_rates(model_path: Path, threads: int, repetitions: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(b"Hi", add_bos=False)
    rates = []
    for repetition in range(repetitions + 1):
        generated, first = 0, 0.0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            generated += 1
            if generated == 1:
                first = time.perf_counter()
            if generated == TOKENS:
                break
        if repetition:
            rates.append((TOKENS - 1) / (time.perf_counter() - first))
    llm.close()
    return rates


def llama_bench_rates(binary: Path, model_path: Path, threads: int, repetitions: int, library_dir: Path | None = None) -> list[float]:
    environment = {**os.environ, "LD_LIBRARY_PATH": str(library_dir)} if library_dir else None
    output = subprocess.run(
        [str(binary), "-m", str(model_path), "-p", "0", "-n", str(TOKENS), "-t", str(threads), "-r", str(repetitions), "-o", "json"],
        capture_output=True, text=True, check=True, env=environment,
    ).stdout  # fmt: skip
    (result,) = json.loads(output)
    return [float(rate) for rate in result["samples_ts"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help=f"a GGUF file (default: the starter model, {STARTER.name})")
    parser.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary, for the reference row")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    model_path = args.model or fetch_starter(models_dir())

    rows: list[tuple[str, list[float]]] = []
    if args.llama_bench:
        import llama_cpp

        bindings_libraries = Path(llama_cpp.__file__).parent / "lib"
        if sys.platform == "linux" and bindings_libraries.is_dir():
            rows.append(("llama-bench, bindings' build", llama_bench_rates(args.llama_bench, model_path, args.threads, args.repetitions, bindings_libraries)))
        rows.append(("llama-bench, own build", llama_bench_rates(args.llama_bench, model_path, args.threads, args.repetitions)))
    rows.append(("llama-cpp-python generate()", bare_binding_rates(model_path, args.threads, args.repetitions)))
    rows.append(("pocketlm stream_chat()", pocketlm_rates(model_path, args.threads, args.repetitions)))

    reference = statistics.mean(rows[0][1])
    table = Table(title=f"tg{TOKENS} on {model_path.name}, {args.threads} threads, {args.repetitions} repetitions")
    for column in ("engine", "tokens/s (mean ± sd)", "ms/token", f"ratio to {rows[0][0]}"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, rates in rows:
        mean = statistics.mean(rates)
        sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
        table.add_row(name, f"{mean:.1f} ± {sd:.1f}", f"{1000 / mean:.2f}", f"{mean / reference:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
