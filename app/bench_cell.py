"""The child process that measures one benchmark cell (a model on a backend), so that its peak memory is its own, a
native abort kills only it, and a cancel is a kill.

`python -P -m pocketlm.app.bench_cell` reads one line of JSON on stdin (the job: cell, settings, threads, the bench
text and the perplexity text or null), loads the model, measures it (backends/speed.py, backends/perplexity.py) and
prints one JSON object per line on stdout for the parent (app/bench_run.py): {"progress": stage, "done", "total"}
while it works, then {"result": ...} (the measurement, or an "error" sentence for a PocketError), and "device_summary"
(where the backend runs, which may name a GPU). It exits at once when its stdin reaches end of file: the parent is
gone, even by kill -9.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from typing import IO, Any

from pocketlm.models.native_child import die_with_parent

# Context beyond the bench's own tokens: the backends' own bounds check "1..context_length-1" with a margin to spare.
_CONTEXT_MARGIN = 16
# backends/perplexity.py's default window: the context must hold one window.
_PERPLEXITY_WINDOW = 512
# The libraries each backend loads a model with, imported before the load is timed: importing torch and transformers
# alone takes seconds, which is not the model's load time (each backend imports them lazily, on its first load).
_ENGINE_MODULES = {"llama.cpp": ("llama_cpp",), "torch": ("torch", "transformers"), "mlx": ("mlx.core", "mlx_lm")}


class Reporter:
    """Lines for the parent on the real stdout; everything else a library prints goes to stderr (fd 1 is pointed at it),
    so that no stray print can be mistaken for a line of the protocol."""

    def __init__(self) -> None:
        self._out: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)

    def say(self, message: dict[str, Any]) -> None:
        try:
            self._out.write(json.dumps(message) + "\n")
            self._out.flush()
        except (BrokenPipeError, ValueError):  # the parent is gone; the stdin watcher ends this process
            pass

    def progress(self, stage: str, done: int, total: int) -> None:
        self.say({"progress": stage, "done": done, "total": total})


def peak_memory_bytes() -> int:
    """This process's peak resident memory: the interpreter, the engine, the weights it touched and its buffers."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def peak_gpu_bytes() -> int | None:
    """The engine's own peak of device memory, where it keeps one (torch on CUDA, MLX on Metal); None elsewhere."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count())))
    mx = sys.modules.get("mlx.core")
    if mx is not None and mx.metal.is_available():
        return int(mx.get_peak_memory())
    return None


def context_for(n_prompt: int, n_gen: int, with_perplexity: bool) -> int:
    """Room for the longest test (llama-bench sizes its context the same way), and a perplexity window when asked."""
    return max(64, n_prompt + n_gen + _CONTEXT_MARGIN, _PERPLEXITY_WINDOW if with_perplexity else 0)


def speed_stage(done: int, tests: list[str], repetitions: int) -> str:
    """What measure_speed runs after `done` runs: its warm-ups, then each test per repetition ("pp 2/5")."""
    if done < len(tests):
        return "warm-up"
    repetition, test = divmod(done - len(tests), len(tests))
    return f"{tests[test]} {repetition + 1}/{repetitions}" if repetition < repetitions else "speed"


def import_engine(backend: str) -> None:
    """Import `backend`'s engine libraries now (those installed), so that load_s times loading the model alone."""
    for module in _ENGINE_MODULES.get(backend, ()):
        try:
            importlib.import_module(module)
        except ImportError:  # the load will say what is missing, in its own words
            pass


def measure(job: dict[str, Any], report: Reporter) -> dict[str, Any]:
    from pocketlm.app.bench_records import BenchResult, cell_from_dict, measurement_to_dict, settings_from_dict
    from pocketlm.app.model_loading import ModelChoice, load_model
    from pocketlm.backends.base import LoadOptions
    from pocketlm.backends.perplexity import perplexity
    from pocketlm.backends.speed import measure_speed
    from pocketlm.backends.threads import engine_threads
    from pocketlm.models.errors import PocketError

    cell = cell_from_dict(job["cell"])
    settings = settings_from_dict(job["settings"])
    text, perplexity_text = job["text"], job.get("perplexity_text")
    threads = job.get("threads") or engine_threads(beside_ui=False)
    # No crash probe (a second process loading the model first): this process is itself the child a native abort
    # kills in pocketlm's place, and the probe's load would count in load_s.
    options = LoadOptions(context_length=context_for(settings.n_prompt, settings.n_gen, perplexity_text is not None), threads=threads,
                          probe_crashes=False)  # fmt: skip
    report.progress("loading", 0, 1)
    import_engine(cell.backend)
    started = time.perf_counter()
    model = load_model(ModelChoice(cell.model, cell.path, cell.format), options, cell.backend)
    load_s = time.perf_counter() - started
    report.progress("loading", 1, 1)
    tests = [test for test, length in (("pp", settings.n_prompt), ("tg", settings.n_gen)) if length > 0]
    runs = len(tests) * (1 + settings.repetitions)  # measure_speed's steps: a warm-up of each test, then each repetition
    report.progress("warm-up", 0, runs)
    speed = measure_speed(model, settings, text, on_step=lambda done, total: report.progress(speed_stage(done, tests, settings.repetitions), done, total))
    # Read now: perplexity's longer windows would raise the peak, and the figure must not depend on --ppl.
    peak_memory, peak_gpu = peak_memory_bytes(), peak_gpu_bytes()
    measured_perplexity, perplexity_error = None, ""
    if perplexity_text is not None:
        try:
            measured_perplexity = perplexity(model, perplexity_text, on_step=lambda done, total: report.progress("perplexity", done, total))
        except PocketError as error:  # the speed stands; the row says why perplexity is missing
            perplexity_error = str(error)
    result = BenchResult(cell=cell, speed=speed, load_s=load_s, peak_memory_bytes=peak_memory, peak_gpu_bytes=peak_gpu,
                         perplexity=measured_perplexity, threads=threads, device=model.description.device,
                         perplexity_error=perplexity_error)  # fmt: skip
    return measurement_to_dict(result)


def device_summary(backend: str) -> str:
    from pocketlm.backends.registry import backend_classes

    for backend_class in backend_classes():
        if backend_class.name == backend:
            try:
                return backend_class.device_summary()
            except Exception:  # noqa: BLE001 - a driver that cannot be read names no GPU; the figures still count
                return ""
    return ""


def main() -> int:
    # Ctrl-C reaches the whole process group; the parent decides what it means and kills this child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = Reporter()
    job = json.loads(sys.stdin.buffer.readline())
    die_with_parent()
    from pocketlm.backends.library_warnings import quiet_library_warnings
    from pocketlm.models.errors import PocketError

    quiet_library_warnings()
    summary = device_summary(job["cell"]["backend"])  # before measuring: it imports the engine, which load_s must not time
    try:
        measurement = measure(job, report)
    except PocketError as error:
        measurement = {"error": str(error)}
    report.say({"result": measurement, "device_summary": summary})
    return 0


if __name__ == "__main__":
    try:
        status = main()
    except BaseException:  # a Python error (not a PocketError): its traceback on stderr is what the parent shows
        import traceback

        traceback.print_exc()
        status = 1
    # os._exit, not a normal exit: the stdin watcher holds stdin's lock (the interpreter's shutdown would abort on it),
    # and MLX's threads are not always joined at teardown (app/cli.py's _exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
