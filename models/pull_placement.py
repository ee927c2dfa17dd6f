"""`pocketlm pull … --output PATH`: the pulled model placed where the user asked, still registered.

The download itself goes through the Hugging Face cache as always (resumable, verified); then the files are put at
PATH, by a hard link where the cache and PATH share a filesystem (no second copy, no time) and by a copy otherwise.
Files this pull downloaded are then taken out of the cache, so the model exists once, at PATH; files that were in the
cache before (another tool's, or another model's) stay there.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

from pocketlm.models.durable import NO_ROOM_ERRNOS, durable_replace, fsync_path
from pocketlm.models.errors import Cancelled, NotEnoughDisk, PocketError
from pocketlm.models.leftovers import partial_name, working_elsewhere
from pocketlm.models.locations import models_dir

_COPY_CHUNK = 16 * 2**20


def placement_target(output: Path, sources: list[Path], single_file: bool) -> tuple[Path, Path]:
    """(the folder the files go into, the path the model is registered at) for `--output output`.

    A single GGUF goes to `output` itself, or inside it when it is an existing folder; anything else (a checkpoint, a
    split GGUF) becomes the folder `output`.
    """
    output = output.expanduser().absolute()
    if single_file and not output.is_dir():
        return output.parent, output
    if single_file:
        return output, output / sources[0].name
    return output, output


def place_files(sources: list[Path], folder: Path, model_path: Path, single_file: bool, cancel: threading.Event | None = None) -> bool:
    """Put `sources` into `folder` (the single file at `model_path`), whole or not at all. Returns whether this
    created `folder` (then it is pocketlm's own, and `rm` deletes it whole); a failure removes a folder it created."""
    targets = [model_path] if single_file else [folder / source.name for source in sources]
    taken = [t for t in targets if t.exists() or t.is_symlink()]
    if taken:
        raise PocketError(f"{taken[0]} already exists; pocketlm does not write over it.", "Choose another --output, or move that file away.")
    created = _make_folder(folder)
    written: list[Path] = []
    try:
        # A kill -9 while a file is half placed leaves `.X.<pid>.partial` there: the mark has the next start sweep it.
        with working_elsewhere(folder, models_dir()):
            for source, target in zip(sources, targets):
                temporary = target.with_name(partial_name(target.name, os.getpid()))
                _link_or_copy(source.resolve(), temporary, cancel)
                durable_replace(temporary, target)
                written.append(target)
    except OSError as error:
        _undo(written, folder if created else None)
        if error.errno in NO_ROOM_ERRNOS:
            raise NotEnoughDisk(f"There is no room in {folder} for the pulled files ({error.strerror}); nothing was kept there.",
                                "Free some space, or choose another --output.") from None  # fmt: skip
        raise PocketError(f"Cannot write the pulled files into {folder} ({error.strerror or error}).", "Choose a folder you can write to.") from None
    except BaseException:
        _undo(written, folder if created else None)
        raise
    fsync_path(folder)
    return created


def _make_folder(folder: Path) -> bool:
    """Create `folder` (and its missing parents); whether it did not exist before."""
    if folder.is_dir():
        return False
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as error:
        raise PocketError(f"Cannot create {folder} ({error.strerror or error}).", "Choose a folder you can write to.") from None
    return True


def _undo(written: list[Path], created: Path | None) -> None:
    """Take back what a failed placement wrote, and the folder when it made it (the folder is then empty)."""
    for path in written:
        path.unlink(missing_ok=True)
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


def _link_or_copy(source: Path, temporary: Path, cancel: threading.Event | None) -> None:
    try:
        os.link(source, temporary)
        return
    except OSError as error:
        # Another filesystem, or one without hard links: copy instead. Anything else (no room, no permission) is real.
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
            raise
    try:
        with source.open("rb") as reader, temporary.open("wb") as writer:
            while chunk := reader.read(_COPY_CHUNK):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"Stopped placing the pulled files at {temporary.parent}; they stay in the Hugging Face cache.")
                writer.write(chunk)
        shutil.copystat(source, temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
