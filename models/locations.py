"""Where pocketlm keeps its data. POCKETLM_HOME overrides the platform's user data directory."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def data_dir() -> Path:
    override = os.environ.get("POCKETLM_HOME")
    path = Path(override) if override else Path(platformdirs.user_data_dir("pocketlm", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_path() -> Path:
    """The SQLite file holding the model registry and the conversations."""
    return data_dir() / "pocketlm.sqlite3"


def models_dir() -> Path:
    """Where models that do not live in the Hugging Face cache are kept (the starter, conversions)."""
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
