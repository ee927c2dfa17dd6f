"""Model files that llama.cpp has opened on this machine without dying, so later loads skip the crash probe.

A file is known by its resolved path and what `stat` says about it (size, mtime in nanoseconds, inode): replacing
or rewriting it changes one of them, and it is probed again. Any path counts, inside the store or not.

The table is only a cache of probes that went well: `was_verified` and `record_verified` treat a database that
cannot be opened, read or written (locked, read-only, full, damaged) as an empty one, so the worst it costs is
another probe, never a load.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.database import connect, migrate

_COMPONENT = "verified_files"
_MIGRATIONS = [
    """CREATE TABLE verified_model_files (
        path TEXT NOT NULL, engine TEXT NOT NULL, size_bytes INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL, verified_at REAL NOT NULL,
        PRIMARY KEY (path, engine))""",
]


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another without reading it."""

    path: str
    size_bytes: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """The identity of `path` now; OSError if it cannot be stat'ed."""
        resolved = Path(path).resolve()
        stat = os.stat(resolved)
        return cls(str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)


class VerifiedFiles:
    """The `verified_model_files` table. `engine` names what opened the file and how (e.g. "llama.cpp 0.3.36 gpu")."""

    def __init__(self, database: Path) -> None:
        self._connection = connect(database)
        try:
            migrate(self._connection, _COMPONENT, _MIGRATIONS)
        except BaseException:
            self._connection.close()
            raise

    def is_verified(self, identity: FileIdentity, engine: str) -> bool:
        row = self._connection.execute(
            "SELECT size_bytes, mtime_ns, inode FROM verified_model_files WHERE path = ? AND engine = ?", (identity.path, engine)
        ).fetchone()
        return row is not None and tuple(row) == (identity.size_bytes, identity.mtime_ns, identity.inode)

    def remember(self, identity: FileIdentity, engine: str) -> None:
        self._connection.execute(
            "INSERT OR REPLACE INTO verified_model_files VALUES (?, ?, ?, ?, ?, ?)",
            (identity.path, engine, identity.size_bytes, identity.mtime_ns, identity.inode, time.time()),
        )

    def close(self) -> None:
        self._connection.close()


def was_verified(identity: FileIdentity, engine: str) -> bool:
    """Whether this version of the file opened before with `engine`; False when the database cannot say."""
    from pocketlm.models.locations import database_path

    try:
        with closing(VerifiedFiles(database_path())) as verified:
            return verified.is_verified(identity, engine)
    except (sqlite3.Error, OSError):
        return False


def record_verified(identity: FileIdentity, engine: str) -> None:
    """Remember that this version of the file opened with `engine`, if the database can be written."""
    from pocketlm.models.locations import database_path

    try:
        with closing(VerifiedFiles(database_path())) as verified:
            verified.remember(identity, engine)
    except (sqlite3.Error, OSError):
        pass  # the next load probes the file again: slower, still correct
