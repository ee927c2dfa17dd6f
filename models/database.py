"""One SQLite connection recipe for every table pocketlm keeps."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    """Open `path` in WAL mode, so a reader never blocks the writer and a killed process loses no commit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: the app streams replies in a worker thread; each store serialises its own writes.
    connection = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives a killed process (only a power cut can lose the last commits) and keeps a commit
    # per streamed piece cheap.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


def migrate(connection: sqlite3.Connection, component: str, migrations: list[str]) -> None:
    """Bring `component`'s tables to the latest schema: run each migration not yet applied.

    A migration is a script of statements separated by `;` at line ends (statements must not contain `;` otherwise).

    Several components share one database file, so each keeps its own version number instead of `user_version`.
    """
    connection.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    # Rebuilding a table (create, copy, drop, rename) with foreign keys on would cascade the drop into the tables
    # that reference it; SQLite's recipe is to switch them off (outside the transaction) and check them before commit.
    connection.execute("PRAGMA foreign_keys=OFF")
    connection.execute("BEGIN IMMEDIATE")
    try:
        row = connection.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
        version = row[0] if row else 0
        for number, script in enumerate(migrations[version:], start=version + 1):
            for statement in filter(str.strip, re.split(r";\s*$", script, flags=re.MULTILINE)):
                connection.execute(statement)
            connection.execute("INSERT OR REPLACE INTO schema_versions VALUES (?, ?)", (component, number))
        if broken := connection.execute("PRAGMA foreign_key_check").fetchall():
            raise sqlite3.IntegrityError(f"migrating {component} broke {len(broken)} references")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    finally:
        connection.execute("PRAGMA foreign_keys=ON")
