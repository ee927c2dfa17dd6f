"""Remove a model: unregister it and delete the files that are pocketlm's and that no other model uses."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.models.hub_download import PARTIAL_SUFFIX
from pocketlm.models.store import LocalModel, ModelStore


@dataclass
class Removal:
    deleted: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    kept_shared: list[Path] = field(default_factory=list)  # still used by another model
    kept_not_owned: list[Path] = field(default_factory=list)  # imported: the user's own files


def plan_removal(store: ModelStore, model: LocalModel) -> Removal:
    """What removing `model` would delete and keep, so the user can be asked first."""
    removal = Removal()
    for path in model.files or (model.path,):
        if not model.owned:
            removal.kept_not_owned.append(path)
        elif [user for user in store.users_of(path) if user != model.name]:
            removal.kept_shared.append(path)
        else:
            removal.deleted.append(path)
            removal.freed_bytes += _size(path)
    return removal


def remove_model(store: ModelStore, model: LocalModel) -> Removal:
    removal = plan_removal(store, model)
    store.remove(model.name)  # unregister first: a model must never point at files that are gone
    for path in removal.deleted:
        _delete(path)
    return removal


def _size(path: Path) -> int:
    try:
        return path.stat().st_size  # a Hub cache link counts its blob
    except OSError:
        return 0


def _delete(path: Path) -> None:
    """Delete `path`; for a Hub cache link, its blob too unless another snapshot links to it, then empty folders."""
    snapshots = next((p for p in path.parents if p.name == "snapshots"), None)
    if path.is_symlink() and snapshots is not None:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        if not any(link.is_symlink() and link.resolve() == blob for link in snapshots.rglob("*")):
            blob.unlink(missing_ok=True)
        _prune_empty(path.parent, stop=snapshots)
        repo_folder = snapshots.parent
        paused = list((repo_folder / "blobs").glob(f"*{PARTIAL_SUFFIX}"))
        if not any(snapshots.iterdir()) and not paused:  # nothing left of this repo: drop its refs and folder
            shutil.rmtree(repo_folder, ignore_errors=True)
        return
    path.unlink(missing_ok=True)


def _prune_empty(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        os.rmdir(folder)
        folder = folder.parent
