"""What a benchmark asks for and what it found: the request, its cells (model × backend), their results and the run,
with the JSON form that crosses the child process's pipe and the history's database.

The types are re-exported by app/bench_run.py, where the contract names them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketlm.app.system_info import SystemInfo
from pocketlm.backends.perplexity import Perplexity
from pocketlm.backends.speed import SpeedResult, SpeedSample, SpeedSettings


@dataclass(frozen=True)
class BenchRequest:
    models: tuple[str, ...]  # as the user named them (store name, prefix, path)
    backends: tuple[str, ...] = ()  # () = every installed backend that loads each model's format
    settings: SpeedSettings = field(default_factory=SpeedSettings)
    threads: int | None = None
    perplexity_text: str | None = None  # a file path, or None for no perplexity
    family: str | None = None  # the model and everything derived from it in the store (not adapters)


@dataclass(frozen=True)
class BenchCell:
    """One model × backend to measure."""

    model: str
    path: Path
    format: str
    quantization: str
    size_bytes: int
    parameter_count: int
    backend: str


@dataclass(frozen=True)
class BenchResult:
    """One cell's outcome: figures, or the sentence saying why there are none."""

    cell: BenchCell
    speed: SpeedResult | None  # None when the cell failed
    load_s: float
    peak_memory_bytes: int  # the child's peak resident memory (ru_maxrss)
    peak_gpu_bytes: int | None
    perplexity: Perplexity | None
    threads: int
    device: str  # ModelDescription.device
    error: str = ""  # one sentence when it failed (the other cells still run)
    perplexity_error: str = ""  # one sentence when the speed was measured but perplexity could not be

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.speed is None


@dataclass(frozen=True)
class BenchRun:
    id: int | None  # the history row, None until saved
    started_at: float
    system: SystemInfo
    request: BenchRequest
    results: tuple[BenchResult, ...]


@dataclass(frozen=True)
class ModelsSkipped:
    """The first event when some of a --family's members are left out: no installed backend loads them (one sentence each)."""

    reasons: tuple[str, ...]


@dataclass(frozen=True)
class CellStarted:
    cell: BenchCell
    index: int  # 1-based
    total: int


@dataclass(frozen=True)
class CellProgress:
    cell: BenchCell
    done: int
    total: int
    stage: str  # "loading", "speed", "perplexity"


@dataclass(frozen=True)
class CellFinished:
    result: BenchResult
    index: int
    total: int


@dataclass(frozen=True)
class RunFinished:
    """The last event: the run as saved in the history (id None when nothing finished), and whether it was cut short."""

    run: BenchRun
    cancelled: bool = False


BenchEvent = ModelsSkipped | CellStarted | CellProgress | CellFinished | RunFinished


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` less the keys `cls` does not have: a record written by a newer pocketlm still reads."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}


def settings_to_dict(settings: SpeedSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def settings_from_dict(data: dict[str, Any]) -> SpeedSettings:
    return SpeedSettings(**_known(SpeedSettings, data))


def speed_to_dict(speed: SpeedResult) -> dict[str, Any]:
    return {"settings": settings_to_dict(speed.settings), "samples": [dataclasses.asdict(s) for s in speed.samples],
            "prompt_digest": speed.prompt_digest}  # fmt: skip


def speed_from_dict(data: dict[str, Any]) -> SpeedResult:
    samples = tuple(SpeedSample(**_known(SpeedSample, sample)) for sample in data.get("samples", []))
    return SpeedResult(settings=settings_from_dict(data.get("settings", {})), samples=samples, prompt_digest=str(data.get("prompt_digest", "")))


def perplexity_from_dict(data: dict[str, Any] | None) -> Perplexity | None:
    return None if data is None else Perplexity(**_known(Perplexity, data))


def cell_to_dict(cell: BenchCell) -> dict[str, Any]:
    return {**dataclasses.asdict(cell), "path": str(cell.path)}


def cell_from_dict(data: dict[str, Any]) -> BenchCell:
    return BenchCell(**{**_known(BenchCell, data), "path": Path(data["path"])})


def request_to_dict(request: BenchRequest) -> dict[str, Any]:
    return {"models": list(request.models), "backends": list(request.backends), "settings": settings_to_dict(request.settings),
            "threads": request.threads, "perplexity_text": request.perplexity_text, "family": request.family}  # fmt: skip


def request_from_dict(data: dict[str, Any]) -> BenchRequest:
    return BenchRequest(models=tuple(data.get("models", ())), backends=tuple(data.get("backends", ())),
                        settings=settings_from_dict(data.get("settings", {})), threads=data.get("threads"),
                        perplexity_text=data.get("perplexity_text"), family=data.get("family"))  # fmt: skip


def measurement_to_dict(result: BenchResult) -> dict[str, Any]:
    """A result less its cell (the parent knows the cell): what the child sends back."""
    return {"speed": None if result.speed is None else speed_to_dict(result.speed), "load_s": result.load_s,
            "peak_memory_bytes": result.peak_memory_bytes, "peak_gpu_bytes": result.peak_gpu_bytes,
            "perplexity": None if result.perplexity is None else dataclasses.asdict(result.perplexity),
            "threads": result.threads, "device": result.device, "error": result.error, "perplexity_error": result.perplexity_error}  # fmt: skip


def measurement_from_dict(cell: BenchCell, data: dict[str, Any]) -> BenchResult:
    speed = data.get("speed")
    return BenchResult(cell=cell, speed=None if speed is None else speed_from_dict(speed), load_s=float(data.get("load_s", 0.0)),
                       peak_memory_bytes=int(data.get("peak_memory_bytes", 0)), peak_gpu_bytes=data.get("peak_gpu_bytes"),
                       perplexity=perplexity_from_dict(data.get("perplexity")), threads=int(data.get("threads", 0)),
                       device=str(data.get("device", "")), error=str(data.get("error", "")),
                       perplexity_error=str(data.get("perplexity_error", "")))  # fmt: skip


def failed_result(cell: BenchCell, error: str, threads: int = 0, load_s: float = 0.0) -> BenchResult:
    return BenchResult(cell=cell, speed=None, load_s=load_s, peak_memory_bytes=0, peak_gpu_bytes=None, perplexity=None,
                       threads=threads, device="", error=error)  # fmt: skip
