"""How long a full `pocketlm bench` takes at its defaults (-p 512 -n 128 -r 5), against the goal of 5 minutes.

    python benchmarks/full_bench.py [CHECKPOINT] [--backends torch,mlx,llama.cpp] [--home DIR]

From one Hugging Face checkpoint (default: the starter's), the script makes, once, in a throw-away POCKETLM_HOME (or
--home, kept for the next run): an f16 and a Q4_K_M GGUF and a 4-bit MLX model (`pocketlm import` and `pocketlm
convert`, without verification). Then it times one `pocketlm bench` of all four as a user runs it: the checkpoint on
torch and mlx, the GGUFs on llama.cpp, the MLX model on mlx (each model on every backend of --backends that loads it).

Per cell it splits the wall time into the measured runs (the samples' own seconds), loading (the child's load_s) and
the rest: the child's start and imports, the warm-ups, and the parent's bookkeeping.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

GOAL_S = 300.0
# store name: `pocketlm convert` arguments that make it from the checkpoint (None: the checkpoint itself), and the
# backends that load it (`pocketlm bench` refuses a model none of the --backend ones loads).
MODELS: dict[str, tuple[list[str] | None, set[str]]] = {
    "bench-hf": (None, {"torch", "mlx"}),
    "bench-f16": (["--to", "gguf", "--outtype", "f16"], {"llama.cpp"}),
    "bench-q4km": (["--to", "gguf", "--quant", "Q4_K_M"], {"llama.cpp"}),
    "bench-mlx4": (["--to", "mlx", "--bits", "4"], {"mlx"}),
}


def pocketlm(*arguments: str, home: Path, capture: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from pocketlm.app.cli import main; main()", *arguments]
    return subprocess.run(command, capture_output=capture, text=True, check=True, env={**os.environ, "POCKETLM_HOME": str(home)})


def make_models(checkpoint: Path, home: Path, console: Console) -> None:
    listed = pocketlm("ls", home=home).stdout
    for name, (conversion, _) in MODELS.items():
        if name in listed:
            continue
        started = time.perf_counter()
        if conversion is None:
            pocketlm("import", str(checkpoint), "--name", name, home=home)
        else:
            pocketlm("convert", "bench-hf", *conversion, "--no-verify", "--name", name, home=home)
        console.print(f"made {name} in {time.perf_counter() - started:.1f} s")


def timed_bench(home: Path, backends: str | None, extra: list[str], console: Console) -> tuple[float, list[float]]:
    """The bench's wall time, and each cell's child process's, from its start to its end (in the order the cells ran:
    the order of the saved run's results). The children are found by polling /proc (Linux); elsewhere the list is empty."""
    chosen = {name.strip() for name in backends.split(",")} if backends else None
    models = [name for name, (_, loaders) in MODELS.items() if chosen is None or loaders & chosen]
    command = [sys.executable, "-c", "from pocketlm.app.cli import main; main()", "bench", *models, *extra]
    if backends:
        command += ["--backend", backends]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "POCKETLM_HOME": str(home)})
    children: dict[int, list[float]] = {}  # pid: [first seen, last seen]
    done = threading.Event()

    def watch() -> None:
        listing = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        while not done.is_set():
            now = time.perf_counter()
            try:
                pids = [int(pid) for pid in listing.read_text().split()]
            except OSError:
                pids = []
            for pid in pids:
                children.setdefault(pid, [now, now])[1] = now
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, errors = process.communicate()
    done.set()
    watcher.join()
    total = time.perf_counter() - started
    for line in errors.splitlines():
        if line.startswith(("✓", "✗", "Saved")):
            console.print(line, markup=False, highlight=False)
    if process.returncode != 0:
        raise SystemExit(f"pocketlm bench failed:\n{errors}")
    Console(width=200).print(output.rstrip(), markup=False, highlight=False)
    return total, [last - first for first, last in sorted(children.values())]


def breakdown(home: Path, cells: list[float], total: float, extra: list[str]) -> Table:
    os.environ["POCKETLM_HOME"] = str(home)
    from pocketlm.app.bench_history import BenchHistory
    from pocketlm.models.locations import database_path

    history = BenchHistory(database_path())
    try:
        run = history.runs(limit=1)[0]
    finally:
        history.close()
    settings = " ".join(extra) or "at the defaults (-p 512 -n 128 -r 5)"
    table = Table(title=f"pocketlm bench {settings}: {total:.0f} s wall (goal {GOAL_S:.0f} s: {'met' if total <= GOAL_S else 'missed'}), load average {os.getloadavg()[0]:.2f}")
    for column in ("cell", "child wall s", "measured runs s", "load s", "start-up, imports, warm-ups s", "pp t/s", "tg t/s"):
        table.add_column(column, justify="left" if column == "cell" else "right")
    for index, result in enumerate(run.results):
        where = f"{result.cell.model} on {result.cell.backend}"
        wall = cells[index] if index < len(cells) else 0.0
        speed = result.speed
        measured = 0.0
        if speed is not None:
            for sample in speed.samples:
                measured += speed.settings.n_prompt / sample.prompt_tokens_per_second if sample.prompt_tokens_per_second else 0.0
                measured += speed.settings.n_gen / sample.tokens_per_second if sample.tokens_per_second else 0.0
        pp = speed.prompt_speed() if speed else None
        tg = speed.generation_speed() if speed else None
        table.add_row(where, f"{wall:.1f}", f"{measured:.1f}", f"{result.load_s:.1f}", f"{wall - measured - result.load_s:.1f}",
                      f"{pp.mean:.1f}" if pp else "–", f"{tg.mean:.1f}" if tg else result.error[:40])  # fmt: skip
    table.add_row("the parent: start-up, planning, saving", f"{total - sum(cells):.1f}", "", "", "", "", "")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help="a Hugging Face checkpoint folder (default: the starter's)")
    parser.add_argument("--backends", help="passed to `pocketlm bench --backend` (default: every installed backend)")
    parser.add_argument("--home", type=Path, help="POCKETLM_HOME to make the models in and keep (default: a temporary one)")
    parser.add_argument("--bench-args", default="", help="more `pocketlm bench` options, e.g. '-p 32 -n 8 -r 1' to try the script quickly")
    arguments = parser.parse_args()
    checkpoint = arguments.checkpoint
    if checkpoint is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.fixtures import starter_checkpoint_path

        checkpoint = starter_checkpoint_path()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="pocketlm-full-bench-") as temporary:
        home = arguments.home or Path(temporary)
        home.mkdir(parents=True, exist_ok=True)
        make_models(checkpoint.resolve(), home, console)
        total, cells = timed_bench(home, arguments.backends, arguments.bench_args.split(), console)
        Console(width=200).print(breakdown(home, cells, total, arguments.bench_args.split()))


if __name__ == "__main__":
    main()
