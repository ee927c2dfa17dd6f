"""Remove a model: unregister it and delete the files that are pocketlm's and that no other model uses.

The order is what keeps the registry and the disk in agreement after a kill -9 at any point: the entry goes first
(one SQLite statement, committed at once), the files after. Killed in between, the files stay on disk with no entry
(space lost until pulled or converted again, which reuses them), never an entry pointing at deleted files. An entry
whose files are already gone (deleted by hand, a disk unplugged) is kept and listed as it is: it may come back, and
`rm` removes it like any other, with nothing to delete. A folder pocketlm wrote (a conversion's GPTQ or MLX output, a
checkpoint `pull --output` placed in a folder it created) goes whole, with the files its format does not list (logs,
extra configs); a folder it did not create never does. The registry keeps that fact (`written_folder`, set only when
pocketlm made the folder), and every listed file must still be pocketlm's own and inside it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.models.fit import human_bytes
from pocketlm.models.store import LocalModel, ModelStore


@dataclass
class Removal:
    deleted: list[Path] = field(default_factory=list)
    freed_bytes: int = 0
    kept_shared: list[Path] = field(default_factory=list)  # still used by another model
    kept_not_owned: list[Path] = field(default_factory=list)  # imported, or in the Hub cache before pocketlm pulled it
    missing: list[Path] = field(default_factory=list)  # already gone from the disk

    def summary(self, name: str) -> str:
        """The question to ask before removing: what goes and what stays."""
        text = f"Remove {name}"
        if self.deleted and all(path.is_dir() and not path.is_symlink() for path in self.deleted):
            text += f" and delete its folder {self.deleted[0]} ({human_bytes(self.freed_bytes)})"
        elif self.deleted:
            text += f" and delete {len(self.deleted)} file{'s' if len(self.deleted) > 1 else ''} ({human_bytes(self.freed_bytes)})"
        if self.kept_shared:
            text += f"; {len(self.kept_shared)} file(s) stay, another model uses them"
        if self.kept_not_owned:
            text += "; files pocketlm did not fetch stay where they are"
        if self.missing:
            text += f"; {len(self.missing)} of its files {'is' if len(self.missing) == 1 else 'are'} already gone"
        return text + "?"


def _identity(path: Path) -> tuple[int, int] | None:
    """What a file is, whatever the path to it: links and copies of a path name the same (device, inode)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def plan_removal(store: ModelStore, model: LocalModel) -> Removal:
    """What removing `model` would delete and keep, so the user can be asked first."""
    in_use = {_identity(f) for other in store.list() if other.name != model.name for f in other.files} - {None}
    removal = Removal()
    if _written_folder(store, model) and not any(_identity(f) in in_use for f in model.files):
        removal.deleted.append(model.path)
        removal.freed_bytes = sum(_size(f) for f in model.path.rglob("*") if f.is_file() and not f.is_symlink())
        return removal
    for path in model.files or (model.path,):
        if not path.exists() and not path.is_symlink():
            removal.missing.append(path)
        elif not store.is_owned(path):
            removal.kept_not_owned.append(path)
        elif _identity(path) in in_use:
            removal.kept_shared.append(path)
        else:
            removal.deleted.append(path)
            removal.freed_bytes += _size(path)
    return removal


def _written_folder(store: ModelStore, model: LocalModel) -> bool:
    """Whether `model` is a folder pocketlm itself created and wrote, every listed file its own."""
    folder = model.path
    if not model.written_folder or not folder.is_dir() or folder.is_symlink() or not model.files:
        return False
    return all(store.is_owned(f) and folder in f.parents for f in model.files)


def remove_model(store: ModelStore, model: LocalModel) -> Removal:
    removal = plan_removal(store, model)
    store.remove(model.name)  # unregister first: a model must never point at files that are gone
    for path in removal.deleted:
        if path.is_dir() and not path.is_symlink():
            for file in model.files:  # the model's own files first, in path order, then what else the folder holds
                delete_file(file)
            shutil.rmtree(path)
        else:
            delete_file(path)
    return removal


def delete_orphans(store: ModelStore, paths: list[Path]) -> None:
    """Delete those of `paths` (files pocketlm owned) that no registered model uses any more."""
    in_use = {_identity(f) for model in store.list() for f in model.files} - {None}
    for path in paths:
        if _identity(path) not in in_use:
            delete_file(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size  # a Hub cache link counts its blob
    except OSError:
        return 0


def _link_target(link: Path) -> Path:
    """Where `link` points, one level only (a blob may itself link into a store other repos share)."""
    return Path(os.path.normpath(link.parent / os.readlink(link)))


def delete_file(path: Path) -> None:
    """Delete `path`. A Hub cache entry goes with its blob, unless another snapshot links to the blob, and the repo's
    folder goes once nothing is left in it; nothing outside the repo's folder is touched."""
    snapshots = next((p for p in path.parents if p.name == "snapshots"), None)
    repo_folder = snapshots.parent if snapshots is not None else None
    if not (path.is_symlink() and repo_folder is not None and repo_folder.name.startswith("models--")):
        path.unlink(missing_ok=True)
        return
    blob = _link_target(path)
    path.unlink(missing_ok=True)
    if blob.parent == repo_folder / "blobs":
        linked_elsewhere = any(link.is_symlink() and _link_target(link) == blob for link in snapshots.rglob("*"))
        if not linked_elsewhere:
            blob.unlink(missing_ok=True)  # a link into a shared store: only the link goes
    folder = path.parent
    while folder != snapshots and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
    blobs = repo_folder / "blobs"
    # Paused pulls, other tools' downloads in progress and unlinked blobs keep the folder.
    if not any(snapshots.iterdir()) and not (blobs.is_dir() and any(blobs.iterdir())):
        shutil.rmtree(repo_folder, ignore_errors=True)
