"""Every benchmark run in SQLite (the store's database file), so runs compare over time and across machines.

A run is one row (when, the machine, what was asked); each cell's result is a row of its own with the figures a query
compares (model, backend, format, size, memory, load time, perplexity) as columns, and the repetitions themselves as
JSON (samples of a SpeedResult). Models are named as plain text: a removed model keeps its history.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import replace
from pathlib import Path

from pocketlm.app.bench_records import BenchCell, BenchResult, BenchRun, request_from_dict, request_to_dict, speed_from_dict, speed_to_dict
from pocketlm.app.system_info import SystemInfo
from pocketlm.backends.perplexity import Perplexity
from pocketlm.models.database import connect, migrate

_MIGRATIONS = [
    # 1: runs (the machine as SystemInfo JSON, the request as BenchRequest JSON) and their cells (a cell's repetitions as
    # SpeedResult JSON, NULL when it failed).
    """CREATE TABLE bench_runs (
        id INTEGER PRIMARY KEY,
        started_at REAL NOT NULL,
        system TEXT NOT NULL,
        request TEXT NOT NULL);
    CREATE TABLE bench_results (
        run_id INTEGER NOT NULL REFERENCES bench_runs(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        model TEXT NOT NULL, backend TEXT NOT NULL, format TEXT NOT NULL, quantization TEXT NOT NULL, path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL, parameter_count INTEGER NOT NULL,
        load_s REAL NOT NULL, peak_memory_bytes INTEGER NOT NULL, peak_gpu_bytes INTEGER,
        threads INTEGER NOT NULL, device TEXT NOT NULL, error TEXT NOT NULL,
        speed TEXT,
        perplexity REAL, perplexity_tokens INTEGER, perplexity_windows INTEGER,
        perplexity_error TEXT NOT NULL DEFAULT '',  -- why perplexity is missing from a cell whose speed was measured
        PRIMARY KEY (run_id, position));
    CREATE INDEX bench_results_by_model ON bench_results(model, backend)""",
]
_RESULT_COLUMNS = ("run_id", "position", "model", "backend", "format", "quantization", "path", "size_bytes", "parameter_count", "load_s",
                   "peak_memory_bytes", "peak_gpu_bytes", "threads", "device", "error", "speed", "perplexity", "perplexity_tokens",
                   "perplexity_windows", "perplexity_error")  # fmt: skip
_INSERT_RESULT = f"INSERT INTO bench_results ({', '.join(_RESULT_COLUMNS)}) VALUES ({', '.join('?' * len(_RESULT_COLUMNS))})"


class BenchHistory:
    def __init__(self, database: Path) -> None:
        self._connection = connect(database)
        self._lock = threading.Lock()
        with self._lock:
            migrate(self._connection, "bench", _MIGRATIONS)

    def save(self, run: BenchRun) -> BenchRun:
        """Store `run` (a new row, whatever its id) with all its results in one transaction; returns it with its id."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._connection.execute("INSERT INTO bench_runs (started_at, system, request) VALUES (?, ?, ?)",
                                                  (run.started_at, json.dumps(run.system.to_dict()), json.dumps(request_to_dict(run.request))))  # fmt: skip
                run_id = int(cursor.lastrowid)  # type: ignore[arg-type]
                for position, result in enumerate(run.results):
                    self._connection.execute(_INSERT_RESULT, _result_row(run_id, position, result))
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
        return replace(run, id=run_id)

    def runs(self, limit: int = 50) -> list[BenchRun]:
        """The latest `limit` runs, newest first."""
        with self._lock:
            rows = self._connection.execute("SELECT * FROM bench_runs ORDER BY started_at DESC, id DESC LIMIT ?", (limit,)).fetchall()
        return [self._run(row) for row in rows]

    def get(self, run_id: int) -> BenchRun | None:
        with self._lock:
            row = self._connection.execute("SELECT * FROM bench_runs WHERE id = ?", (run_id,)).fetchone()
        return self._run(row) if row else None

    def delete(self, run_id: int) -> None:
        with self._lock:
            self._connection.execute("DELETE FROM bench_runs WHERE id = ?", (run_id,))

    def close(self) -> None:
        self._connection.close()

    def _run(self, row) -> BenchRun:  # type: ignore[no-untyped-def]
        with self._lock:
            result_rows = self._connection.execute("SELECT * FROM bench_results WHERE run_id = ? ORDER BY position", (row["id"],)).fetchall()
        return BenchRun(id=row["id"], started_at=row["started_at"], system=SystemInfo.from_dict(json.loads(row["system"])),
                        request=request_from_dict(json.loads(row["request"])), results=tuple(_result(r) for r in result_rows))  # fmt: skip


def _result_row(run_id: int, position: int, result: BenchResult) -> tuple[object, ...]:
    cell, ppl = result.cell, result.perplexity
    speed = None if result.speed is None else json.dumps(speed_to_dict(result.speed))
    return (run_id, position, cell.model, cell.backend, cell.format, cell.quantization, str(cell.path), cell.size_bytes,
            cell.parameter_count, result.load_s, result.peak_memory_bytes, result.peak_gpu_bytes, result.threads, result.device,
            result.error, speed, ppl.value if ppl else None, ppl.scored_tokens if ppl else None, ppl.windows if ppl else None,
            result.perplexity_error)  # fmt: skip


def _result(row) -> BenchResult:  # type: ignore[no-untyped-def]
    cell = BenchCell(model=row["model"], path=Path(row["path"]), format=row["format"], quantization=row["quantization"],
                     size_bytes=row["size_bytes"], parameter_count=row["parameter_count"], backend=row["backend"])  # fmt: skip
    perplexity = None
    if row["perplexity_tokens"] is not None:  # measured; SQLite keeps ±inf as REAL but a NaN as NULL: the NULL of a measured one is NaN
        value = math.nan if row["perplexity"] is None else float(row["perplexity"])
        perplexity = Perplexity(value=value, scored_tokens=row["perplexity_tokens"], windows=row["perplexity_windows"])
    return BenchResult(cell=cell, speed=speed_from_dict(json.loads(row["speed"])) if row["speed"] else None, load_s=row["load_s"],
                       peak_memory_bytes=row["peak_memory_bytes"], peak_gpu_bytes=row["peak_gpu_bytes"], perplexity=perplexity,
                       threads=row["threads"], device=row["device"], error=row["error"], perplexity_error=row["perplexity_error"])  # fmt: skip
