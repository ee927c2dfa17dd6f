"""A benchmark run: which cells (model × backend) to measure, each measured in a child process, the run saved.

Each cell runs in its own child (app/bench_cell.py): its peak memory is its own and not the sum of every model loaded
before it, a native abort on one file costs that cell only (its row says why) and a cancel kills the child at once,
whatever engine call it is in. run_bench is a generator of events, so the CLI renders them with rich and the Bench
screen in a worker, from one producer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocketlm.app.bench_records import (BenchCell, BenchEvent, BenchRequest, BenchResult, BenchRun, CellFinished, CellProgress, CellStarted,
                                        ModelsSkipped, RunFinished, cell_to_dict, failed_result, measurement_from_dict, settings_to_dict)  # fmt: skip
from pocketlm.app.system_info import collect_system_info, gpu_named_in
from pocketlm.models.errors import BackendUnavailable, Cancelled, PocketError
from pocketlm.models.model_reference import find_model
from pocketlm.models.native_child import NativeChild, child_command, death_cause, signal_name

if TYPE_CHECKING:
    from pocketlm.app.bench_history import BenchHistory
    from pocketlm.backends.base import Backend
    from pocketlm.models.store import LocalModel, ModelStore

__all__ = ["BenchCell", "BenchEvent", "BenchPlan", "BenchRequest", "BenchResult", "BenchRun", "CellFinished", "CellProgress", "CellStarted",
           "ModelsSkipped", "RunFinished", "family_of", "plan_bench", "plan_cells", "run_bench"]  # fmt: skip

# Test seam: the module run as the child instead of the real one (a test uses one that aborts). Never set in normal use.
CELL_MODULE_ENV = "POCKETLM_BENCH_CELL_MODULE"
_CELL_MODULE = "pocketlm.app.bench_cell"


@dataclass(frozen=True)
class BenchPlan:
    cells: list[BenchCell]
    skipped: tuple[str, ...] = ()  # a sentence per --family member that no installed backend loads


def plan_cells(store: ModelStore, request: BenchRequest) -> list[BenchCell]:
    """The cells plan_bench finds (the family members it leaves out are not mentioned)."""
    return plan_bench(store, request).cells


def plan_bench(store: ModelStore, request: BenchRequest) -> BenchPlan:
    """Every model named (and the --family's members) × every backend asked for that loads its format (by default:
    every installed one that does). A model named outright that no chosen (or installed) backend loads is refused; a
    family member is left out: silently for --backend (`--family X --backend llama.cpp` means X's GGUFs), with a
    sentence in `skipped` when no installed backend loads it (an MLX model on Linux, a GPTQ one without gptqmodel)."""
    from pocketlm.backends.registry import backend_classes, backend_for, loaders_for

    known = backend_classes()
    chosen_backends = [_installed_backend(name, known) for name in dict.fromkeys(request.backends)]
    named = [find_model(store, query) for query in request.models]
    family = family_of(store, find_model(store, request.family)) if request.family else []
    cells: list[BenchCell] = []
    skipped: list[str] = []
    seen: set[tuple[str, Path]] = set()
    for model, outright in [(m, True) for m in named] + [(m, False) for m in family]:
        if (model.name, model.path) in seen:
            continue
        seen.add((model.name, model.path))
        if model.is_adapter:
            raise PocketError(f"{model.name} is a LoRA adapter, not a model.", "Bench the model it was trained on; adapters are not benchmarked.")
        if chosen_backends:
            backends = [backend for backend in chosen_backends if model.format in backend.formats]
            if not backends and outright:
                loaders = ", ".join(b.name for b in loaders_for(model.format, known)) or "none"
                raise BackendUnavailable(f"{model.name} is a {model.format} model, which {_listing([b.name for b in chosen_backends])} cannot load.",
                                         f"Backends that load {model.format} models: {loaders}.")  # fmt: skip
        else:
            backends = [backend for backend in loaders_for(model.format, known) if backend.is_available()]
            if not backends and outright:
                backend_for(model.format, known=known)  # raises the sentence naming what to install
            elif not backends:
                skipped.append(_unloadable(model.name, model.format, known))
        cells += [_cell(model, backend.name) for backend in backends]
    if not cells:
        if not request.models and not request.family:
            raise PocketError("No model to bench.", "Name one or more models (`pocketlm bench MODEL...`), or a family (--family MODEL).")
        if skipped:
            raise BackendUnavailable(f"No installed backend loads any model of this family: {' '.join(skipped)}", "Install a backend that loads them.")
        raise PocketError("None of the chosen backends loads any of these models.", "Leave out --backend to use every backend that does.")
    return BenchPlan(cells, tuple(skipped))


def _unloadable(name: str, model_format: str, known: tuple[type[Backend], ...]) -> str:
    """Why a family member is left out: no installed backend loads its format (and what would)."""
    from pocketlm.backends.registry import loaders_for

    loaders = loaders_for(model_format, known)
    if not loaders:
        return f"{name} is left out: no backend loads {model_format} models."
    hints = "; ".join(f"{b.name}: {b.install_hint}" for b in loaders)
    return f"{name} is left out: {model_format} models need a backend that is not installed ({hints})."


def family_of(store: ModelStore, model: LocalModel) -> list[LocalModel]:
    """`model` and everything converted or quantized from it, and from those, recursively (adapters left out)."""
    members, seen, pending = [model], {model.name}, [model.name]
    while pending:
        for name in store.children_of(pending.pop(0)):
            child = store.get(name)
            if name in seen or child is None or child.is_adapter:
                continue
            seen.add(name)
            members.append(child)
            pending.append(name)
    return members


def run_bench(store: ModelStore, request: BenchRequest, history: BenchHistory, cancel: threading.Event) -> Iterator[BenchEvent]:
    """Measure every cell, one child process at a time, then save the run (every finished cell, also when cancelled):
    CellStarted, CellProgress…, CellFinished per cell, then RunFinished with the run as the history holds it."""
    from pocketlm.converters.calibration import HELD_OUT_TEXT

    plan = plan_bench(store, request)
    cells = plan.cells
    if plan.skipped:
        yield ModelsSkipped(plan.skipped)
    perplexity_text = read_text_file(Path(request.perplexity_text)) if request.perplexity_text else None
    system, started_at = collect_system_info(), time.time()
    results: list[BenchResult] = []
    device_summaries: list[str] = []
    cancelled = False
    for index, cell in enumerate(cells, start=1):
        yield CellStarted(cell, index, len(cells))
        job = {"cell": cell_to_dict(cell), "settings": settings_to_dict(request.settings), "threads": request.threads,
               "text": HELD_OUT_TEXT, "perplexity_text": perplexity_text}  # fmt: skip
        child = _CellProcess(cell, job)
        try:
            yield from child.run(cancel)
        except Cancelled:
            cancelled = True
            break
        results.append(child.result())
        device_summaries.append(child.device_summary)
        yield CellFinished(results[-1], index, len(cells))
    run = BenchRun(id=None, started_at=started_at, system=system.with_gpu(system.gpu or gpu_named_in(device_summaries)),
                   request=request, results=tuple(results))  # fmt: skip
    if results:
        saved = history.save(run)
        run = history.get(saved.id) or saved  # type: ignore[arg-type]
    yield RunFinished(run, cancelled)


def read_text_file(path: Path) -> str:
    """A text file to score perplexity on, as UTF-8; a sentence when it cannot be read or holds nothing."""
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PocketError(f"{path} does not exist.", "Give the path of a plain text file to measure perplexity on.") from None
    except UnicodeDecodeError:
        raise PocketError(f"{path.name} is not UTF-8 text.", "Give a plain text file (UTF-8) to measure perplexity on.") from None
    except OSError as error:
        raise PocketError(f"{path} cannot be read ({error.strerror or error}).", "Check the path and its permissions.") from None
    if not text.strip():
        raise PocketError(f"{path.name} is empty.", "Give a text of at least a few hundred words to measure perplexity on.")
    return text


class _CellProcess:
    """One child measuring one cell: its progress as events, its result or the sentence explaining its death."""

    def __init__(self, cell: BenchCell, job: dict[str, Any]) -> None:
        self.cell = cell
        self.job = job
        self.child = NativeChild(child_command(os.environ.get(CELL_MODULE_ENV) or _CELL_MODULE))
        self.measurement: dict[str, Any] | None = None
        self.device_summary = ""

    def run(self, cancel: threading.Event) -> Iterator[CellProgress]:
        """CellProgress events until the child ends; Cancelled (the child killed) when `cancel` is set."""

        def check_cancel() -> None:
            if cancel.is_set():
                raise Cancelled("The benchmark was cancelled.")

        yield CellProgress(self.cell, 0, 1, "starting")
        for line in self.child.lines(check_cancel, json.dumps(self.job).encode() + b"\n"):
            if event := self._read(line):
                yield event

    def _read(self, line: str) -> CellProgress | None:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:  # not ours: the child points stray output at stderr, but be lenient
            return None
        if "progress" in message:
            return CellProgress(self.cell, int(message.get("done", 0)), int(message.get("total", 0)), str(message["progress"]))
        if "result" in message:
            self.measurement = message["result"]
            self.device_summary = str(message.get("device_summary", ""))
        return None

    def result(self) -> BenchResult:
        if self.measurement is not None:
            if "speed" in self.measurement or "load_s" in self.measurement:
                return measurement_from_dict(self.cell, self.measurement)
            return failed_result(self.cell, str(self.measurement.get("error", "")) or self._death())
        return failed_result(self.cell, self._death())

    def _death(self) -> str:
        """Why the child ended without a result, in one sentence."""
        where = f"{self.cell.model} on {self.cell.backend}"
        if self.child.start_error:
            return f"The measurement of {where} could not start ({self.child.start_error})."
        code = self.child.returncode or 0
        cause = death_cause(code)
        if cause == "killed":
            return f"The measurement of {where} was killed, probably for lack of memory."
        if cause == "crashed":
            return f"{self.cell.backend} crashed while measuring {self.cell.model} ({signal_name(-code)}: {self.child.last_words()}); the file may be damaged."
        if cause == "stopped":
            return f"The measurement of {where} was stopped by {signal_name(-code)}."
        return f"The measurement of {where} failed ({self.child.last_words()})."


def _installed_backend(name: str, known: tuple[type[Backend], ...]) -> type[Backend]:
    named = [backend for backend in known if backend.name == name]
    if not named:
        raise BackendUnavailable(f"No backend is named {name!r}.", f"Known backends: {', '.join(b.name for b in known) or 'none'}.")
    if not named[0].is_available():
        raise BackendUnavailable(f"The {name} backend is not installed.", named[0].install_hint)
    return named[0]


def _cell(model: LocalModel, backend: str) -> BenchCell:
    return BenchCell(model=model.name, path=model.path, format=model.format, quantization=model.quantization, size_bytes=model.size_bytes,
                     parameter_count=model.parameter_count, backend=backend)  # fmt: skip


def _listing(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]

