"""pp512 and tg128 of `pocketlm bench` on llama.cpp against llama.cpp's own `llama-bench`, side by side, interleaved.

    python benchmarks/bench_speed.py --llama-bench PATH/TO/llama-bench [--model GGUF] [--threads N] [--rounds 5]
                                     [--repetitions 5] [-p 512] [-n 128] [--cpus 0,1] [--save FILE.json]

Rows, measured in one run on the same file, thread count and cores:
  llama-bench, bindings' libraries  the C++ tool on the very libraries llama-cpp-python compiled (LD_LIBRARY_PATH, Linux):
                                    the reference, since it leaves only the bindings' and pocketlm's own cost
  llama-bench, its own build        the same tool on the libraries built beside it: tells compiler flags apart
  pocketlm bench                    the real `pocketlm bench MODEL --backend llama.cpp --json` command (a child process
                                    per cell, backends/speed.py's measure_speed through ChatModel.stream_tokens)
  llama.cpp inside pocketlm bench   llama.cpp's own count of those same runs (llama_perf_context): the engine's time
                                    without the Python around it

Each round runs every tool once (a fresh process, its own warm-up, -r repetitions), in an order that rotates from
round to round, so a burst of load elsewhere falls on all of them alike; every process is pinned to the same cores.
Figures are mean ± sd (and median) over all repetitions of all rounds; the ratios to the reference are of the means
and of the medians, with the range of the per-round ratios of means beside them. Goal: pocketlm ≥ 0.97× llama-bench on the bindings' libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pocketlm.models.fit import physical_cores

TESTS = ("pp", "tg")


@dataclass
class Figures:
    """One tool's samples (tokens/s), by test, kept per round for the paired ratios."""

    name: str
    rounds: list[dict[str, list[float]]] = field(default_factory=list)

    def samples(self, test: str) -> list[float]:
        return [value for round_ in self.rounds for value in round_.get(test, [])]

    def round_mean(self, index: int, test: str) -> float | None:
        values = self.rounds[index].get(test, []) if index < len(self.rounds) else []
        return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class Tool:
    name: str
    run: Callable[[], dict[str, dict[str, list[float]]]]  # {row name: {test: samples}}: one process may give two rows


def pinned(command: list[str], args: argparse.Namespace) -> list[str]:
    """`command` on the chosen cores, at the chosen niceness: the same for every tool."""
    command = ["taskset", "-c", args.cpus, *command] if args.cpus else command
    return ["nice", "-n", str(args.nice), *command] if args.nice else command


def llama_bench(binary: Path, model: Path, args: argparse.Namespace, library_dir: Path | None) -> dict[str, list[float]]:
    environment = {**os.environ, "LD_LIBRARY_PATH": str(library_dir)} if library_dir else None
    command = [str(binary), "-m", str(model), "-p", str(args.n_prompt), "-n", str(args.n_gen), "-t", str(args.threads),
               "-r", str(args.repetitions), "-o", "json"]  # fmt: skip
    output = subprocess.run(pinned(command, args), capture_output=True, text=True, check=True, env=environment).stdout
    figures: dict[str, list[float]] = {}
    for record in json.loads(output):
        test = "pp" if record["n_prompt"] > 0 else "tg"
        figures[test] = [float(rate) for rate in record["samples_ts"]]
    return figures


def pocketlm_bench(model: Path, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """`pocketlm bench` as a user runs it, in a throw-away POCKETLM_HOME; the engine's per-repetition figures come from
    the run the command saved in its history."""
    from pocketlm.app.bench_history import BenchHistory

    with tempfile.TemporaryDirectory(prefix="pocketlm-bench-speed-") as home:
        command = [sys.executable, "-c", "from pocketlm.app.cli import main; main()", "bench", str(model), "--backend", "llama.cpp",
                   "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions), "--threads", str(args.threads), "--json"]  # fmt: skip
        output = subprocess.run(pinned(command, args), capture_output=True, text=True, check=True, env={**os.environ, "POCKETLM_HOME": home}).stdout
        records = json.loads(output)
        history = BenchHistory(Path(home) / "pocketlm.sqlite3")
        try:
            run = history.get(int(records[0]["run_id"]))
        finally:
            history.close()
    assert run is not None and run.results[0].speed is not None, records
    samples = run.results[0].speed.samples
    return {
        "pocketlm bench": {"pp": [s.prompt_tokens_per_second for s in samples if s.prompt_tokens_per_second],
                           "tg": [s.tokens_per_second for s in samples if s.tokens_per_second]},  # fmt: skip
        "llama.cpp inside pocketlm bench": {"pp": [s.engine_prompt_tokens_per_second for s in samples if s.engine_prompt_tokens_per_second],
                                            "tg": [s.engine_tokens_per_second for s in samples if s.engine_tokens_per_second]},  # fmt: skip
    }


def bindings_library_dir(binary: Path) -> Path | None:
    """llama-cpp-python's own libraries, when llama-bench really loads them from there (Linux: LD_LIBRARY_PATH wins
    over the binary's RUNPATH; checked with ldd rather than assumed)."""
    import llama_cpp

    library_dir = Path(llama_cpp.__file__).parent / "lib"
    if sys.platform != "linux" or not library_dir.is_dir() or shutil.which("ldd") is None:
        return None
    linked = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(library_dir)}).stdout
    resolved = [line.split("=>")[1].split()[0] for line in linked.splitlines() if "libggml-cpu" in line and "=>" in line]
    return library_dir if resolved and Path(resolved[0]).resolve().parent == library_dir.resolve() else None


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"


def spread(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f} ({statistics.median(values):.1f})"


def ratio(row: Figures, reference: Figures, test: str) -> str:
    """Of the means, then of the medians (which a burst of load elsewhere moves less), then the per-round range."""
    ours, theirs = row.samples(test), reference.samples(test)
    if not ours or not theirs:
        return "–"
    per_round = [a / b for i in range(len(row.rounds)) if (a := row.round_mean(i, test)) and (b := reference.round_mean(i, test))]
    overall = f"{statistics.fmean(ours) / statistics.fmean(theirs):.3f} / {statistics.median(ours) / statistics.median(theirs):.3f}"
    return f"{overall} ({min(per_round):.2f}–{max(per_round):.2f})" if len(per_round) > 1 else overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the starter model)")
    parser.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary (build it from llama-cpp-python's vendor/llama.cpp)")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each tool once per round)")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions per tool and round (-r)")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("--cpus", help="pin every process to these cores, as taskset -c takes them (default: the first --threads cores this process may use)")
    parser.add_argument("--nice", type=int, default=0, help="run every tool at this niceness (negative, as root: ahead of other work on a shared machine)")
    parser.add_argument("--save", type=Path, help="write every sample to this JSON file")
    parser.add_argument("--show", type=Path, help="print the table of a run saved with --save (a run cut short included), measuring nothing")
    args = parser.parse_args()
    if args.show:
        saved = json.loads(args.show.read_text())
        for key in ("model", "cpus"):
            setattr(args, key, None if saved["settings"][key] == "None" else saved["settings"][key])
        args.model = Path(args.model)
        args.threads, args.n_prompt, args.n_gen, args.nice, args.repetitions = (int(saved["settings"][k]) for k in ("threads", "n_prompt", "n_gen", "nice", "repetitions"))
        rows = {name: Figures(name, rounds) for name, rounds in saved["rows"].items()}
        print_table(args, rows, saved["load_averages"])
        return
    if args.model is None:
        from pocketlm.models.locations import models_dir
        from pocketlm.models.starter import fetch_starter

        args.model = fetch_starter(models_dir())
    if args.cpus is None and hasattr(os, "sched_getaffinity") and shutil.which("taskset"):
        args.cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))[: args.threads]))

    tools: list[Tool] = []
    if args.llama_bench:
        library_dir = bindings_library_dir(args.llama_bench)
        if library_dir is not None:
            tools.append(Tool("llama-bench, bindings' libraries", lambda: {"llama-bench, bindings' libraries": llama_bench(args.llama_bench, args.model, args, library_dir)}))
        tools.append(Tool("llama-bench, its own build", lambda: {"llama-bench, its own build": llama_bench(args.llama_bench, args.model, args, None)}))
    tools.append(Tool("pocketlm bench", lambda: pocketlm_bench(args.model, args)))

    console = Console(stderr=True)
    rows: dict[str, Figures] = {}
    loads = [load_average()]
    for round_index in range(args.rounds):
        shift = round_index % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            console.print(f"round {round_index + 1}/{args.rounds}: {tool.name} (load {load_average()})")
            for name, figures in tool.run().items():
                rows.setdefault(name, Figures(name)).rounds.append(figures)
        loads.append(load_average())
        if args.save:  # after every round: a long run cut short keeps what it measured
            args.save.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "load_averages": loads,
                                             "rows": {name: row.rounds for name, row in rows.items()}}, indent=1))  # fmt: skip

    print_table(args, rows, loads)


def print_table(args: argparse.Namespace, rows: dict[str, Figures], loads: list[str]) -> None:
    reference = next(iter(rows.values()))
    rounds = min(len(row.rounds) for row in rows.values())
    title = (f"{args.model.name}: pp{args.n_prompt} and tg{args.n_gen}, {args.threads} threads on cores {args.cpus or 'any'}, nice {args.nice}, "
             f"{rounds} rounds × {args.repetitions} repetitions (load average per round: {', '.join(loads)})")  # fmt: skip
    table = Table(title=title)
    table.add_column("engine")
    for test, length in (("pp", args.n_prompt), ("tg", args.n_gen)):
        table.add_column(f"{test}{length} t/s: mean ± sd (median)", justify="right")
        table.add_column(f"{test}{length} ratio: means / medians (per round)", justify="right")
    for row in rows.values():
        table.add_row(row.name, *(cell for test in TESTS for cell in (spread(row.samples(test)), ratio(row, reference, test))))
    output = Console(width=180)
    output.print(table)
    output.print(f"ratios to {reference.name}; goal: pocketlm bench ≥ 0.97")


if __name__ == "__main__":
    main()
