"""What a killed process leaves in pocketlm's models folder, and the sweep that removes it when the store opens.

Work in progress is named after the process doing it: `.converting-<pid>-<random>/` (a conversion's working folder),
`.<name>.<pid>.partial` (an output file or folder being written), `.<name>.<pid>.aside/` (an old output folder moved
aside for its replacement) and `.<name>.<pid>.registering` (an output file or folder that is finished, or about to
be, and not yet in the registry). A kill -9 runs no cleanup, so the next pocketlm to open the store deletes those
whose process is gone, and with a `.registering` mark the output it names, unless the registry has it after all; a
registered output folder left aside with nothing in its place is put back. A live process's work is never touched; a
process id reused by another program only delays the sweep to a later start. Resumable Hub downloads
(`*.pocketlm-partial`) live in the Hugging Face cache, not here, and are kept on purpose.

Work written outside the models folder (`convert --output`, `pull --output`) is announced first by a mark in the
models folder, `.elsewhere-<pid>-<random>`, holding the absolute path of the folder written to: the sweep reads it,
and once that process is gone it sweeps that folder too, but only the names above that carry that very process id
(the user's own files there are never looked at), then deletes the mark.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CONVERTING_PREFIX = ".converting-"
ELSEWHERE_PREFIX = ".elsewhere-"
_CONVERTING = re.compile(r"^\.converting-(\d+)-")
_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial$")
_REGISTERING = re.compile(r"^\.(.+)\.(\d+)\.registering$")
# A registered output folder moved aside for its replacement (converters/base.py's atomic_output).
_ASIDE = re.compile(r"^\.(.+)\.(\d+)\.aside$")
_ELSEWHERE = re.compile(r"^\.elsewhere-(\d+)-")
# Working folders of pocketlm versions before process ids were in the names: gone once nobody touched them for a day.
_UNNAMED_WORK_AGE_S = 24 * 3600


def partial_name(file_name: str, pid: int) -> str:
    """The name a file is written under until it is complete."""
    return f".{file_name}.{pid}.partial"


def registering_name(file_name: str, pid: int) -> str:
    """The mark that says `file_name` is this process's output, not yet registered."""
    return f".{file_name}.{pid}.registering"


def aside_name(file_name: str, pid: int) -> str:
    """The name an old output folder has while its replacement is swapped in."""
    return f".{file_name}.{pid}.aside"


def converting_prefix(pid: int) -> str:
    """The name prefix of a conversion's working folder (tempfile adds a random part)."""
    return f"{CONVERTING_PREFIX}{pid}-"


def _alive(pid: int) -> bool:
    import psutil  # os.kill(pid, 0) would terminate the process on Windows

    return pid == os.getpid() or psutil.pid_exists(pid)


@contextmanager
def working_elsewhere(folder: Path, models_folder: Path) -> Iterator[None]:
    """Announce, for the block, that this process writes work-in-progress names into `folder` (outside
    `models_folder`), so that a kill -9 there is swept at the next start too. Nothing to do inside the models folder."""
    folder = Path(folder).expanduser().absolute()
    if folder == Path(models_folder).absolute():
        yield
        return
    models_folder.mkdir(parents=True, exist_ok=True)
    descriptor, mark = tempfile.mkstemp(prefix=f"{ELSEWHERE_PREFIX}{os.getpid()}-", dir=models_folder)
    with os.fdopen(descriptor, "w", encoding="utf-8") as writer:
        writer.write(str(folder))
        writer.flush()
        os.fsync(writer.fileno())  # the mark must be on disk before anything it announces is
    try:
        yield
    finally:
        os.unlink(mark)


def _pid_of(entry: os.DirEntry[str]) -> int | None:
    """The process id a work-in-progress name carries; None for any other name."""
    if entry.is_dir(follow_symlinks=False) and (match := _CONVERTING.match(entry.name)):
        return int(match[1])
    if (match := _PARTIAL.match(entry.name) or _ASIDE.match(entry.name)) and (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
        return int(match[match.re.groups])
    if (match := _REGISTERING.match(entry.name)) and entry.is_file(follow_symlinks=False):
        return int(match[2])
    return None


def _abandoned(entry: os.DirEntry[str]) -> bool:
    if entry.is_dir(follow_symlinks=False) and entry.name.startswith(CONVERTING_PREFIX) and not _CONVERTING.match(entry.name):
        folder = Path(entry.path)
        newest = max([entry.stat(follow_symlinks=False).st_mtime] + [p.lstat().st_mtime for p in folder.iterdir()])
        return time.time() - newest > _UNNAMED_WORK_AGE_S
    pid = _pid_of(entry)
    return pid is not None and not _alive(pid)


def _unregistered_output(entry: os.DirEntry[str], is_registered: Callable[[Path], bool]) -> Path | None:
    """The output a dead process's `.registering` mark names, if the registry never got it; None otherwise."""
    output = Path(entry.path).with_name(_REGISTERING.match(entry.name)[1])  # type: ignore[index]
    exists = output.is_file() or (output.is_dir() and not output.is_symlink())
    return output if exists and not is_registered(output) else None


def _restored(entry: os.DirEntry[str], is_registered: Callable[[Path], bool]) -> bool:
    """Put back a registered output folder that a kill -9 left moved aside, its replacement never swapped in: the
    registry's entry has its files again, and the unfinished replacement is swept as any partial."""
    match = _ASIDE.match(entry.name)
    if not match or not entry.is_dir(follow_symlinks=False):
        return False
    original = Path(entry.path).with_name(match[1])
    if original.exists() or original.is_symlink() or not is_registered(original):
        return False
    os.replace(entry.path, original)
    return True


def sweep_leftovers(folder: Path, is_registered: Callable[[Path], bool] = lambda path: True) -> list[Path]:
    """Delete what dead processes left in `folder` (one listing, no recursion), and in the folders outside it that
    their `.elsewhere-` marks name; return what was deleted.

    Never raises: a file that cannot be deleted now is tried again at the next start, and opening the store goes on.
    """
    swept = _sweep(folder, is_registered, only_pid=None)
    try:
        marks = [entry for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False) and _ELSEWHERE.match(entry.name)]
    except OSError:
        return swept
    for mark in marks:
        pid = int(_ELSEWHERE.match(mark.name)[1])  # type: ignore[index]
        if _alive(pid):
            continue
        try:
            elsewhere = Path(Path(mark.path).read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError):
            continue
        if elsewhere.is_absolute():  # a mark cut short by the kill names nothing, and is only deleted
            swept += _sweep(elsewhere, is_registered, only_pid=pid)
        try:
            os.unlink(mark.path)
        except OSError:
            continue
    return swept


def _sweep(folder: Path, is_registered: Callable[[Path], bool], only_pid: int | None) -> list[Path]:
    """One folder's sweep; with `only_pid`, only the work-in-progress names of that (dead) process are touched."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    swept = []
    for entry in entries:
        try:
            if only_pid is not None and _pid_of(entry) != only_pid:
                continue
            if (match := _REGISTERING.match(entry.name)) and entry.is_file(follow_symlinks=False):
                if _alive(int(match[2])):
                    continue
                if (output := _unregistered_output(entry, is_registered)) is not None:
                    if output.is_dir():
                        shutil.rmtree(output)  # a GPTQ or MLX checkpoint: a folder of files
                    else:
                        output.unlink()
                    swept.append(output)
                os.unlink(entry.path)
                swept.append(Path(entry.path))
                continue
            if not _abandoned(entry):
                continue
            if _restored(entry, is_registered):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            swept.append(Path(entry.path))
        except OSError:
            continue
    return swept
