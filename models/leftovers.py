"""What a killed process leaves in pocketlm's models folder, and the sweep that removes it when the store opens.

Work in progress is named after the process doing it: `.converting-<pid>-<random>/` (a conversion's working folder),
`.<file>.<pid>.partial` (an output being written) and `.<file>.<pid>.registering` (an output that is finished, or about
to be, and not yet in the registry). A kill -9 runs no cleanup, so the next pocketlm to open the store deletes those
whose process is gone, and with a `.registering` mark the output it names, unless the registry has it after all. A
live process's work is never touched; a process id reused by another program only delays the sweep to a later start. Resumable Hub downloads (`*.pocketlm-partial`) live in the Hugging Face
cache, not here, and are kept on purpose.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

CONVERTING_PREFIX = ".converting-"
_CONVERTING = re.compile(r"^\.converting-(\d+)-")
_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial$")
_REGISTERING = re.compile(r"^\.(.+)\.(\d+)\.registering$")
# Working folders of pocketlm versions before process ids were in the names: gone once nobody touched them for a day.
_UNNAMED_WORK_AGE_S = 24 * 3600


def partial_name(file_name: str, pid: int) -> str:
    """The name a file is written under until it is complete."""
    return f".{file_name}.{pid}.partial"


def registering_name(file_name: str, pid: int) -> str:
    """The mark that says `file_name` is this process's output, not yet registered."""
    return f".{file_name}.{pid}.registering"


def converting_prefix(pid: int) -> str:
    """The name prefix of a conversion's working folder (tempfile adds a random part)."""
    return f"{CONVERTING_PREFIX}{pid}-"


def _alive(pid: int) -> bool:
    import psutil  # os.kill(pid, 0) would terminate the process on Windows

    return pid == os.getpid() or psutil.pid_exists(pid)


def _abandoned(entry: os.DirEntry[str]) -> bool:
    if entry.is_dir(follow_symlinks=False) and entry.name.startswith(CONVERTING_PREFIX):
        if match := _CONVERTING.match(entry.name):
            return not _alive(int(match[1]))
        folder = Path(entry.path)
        newest = max([entry.stat(follow_symlinks=False).st_mtime] + [p.lstat().st_mtime for p in folder.iterdir()])
        return time.time() - newest > _UNNAMED_WORK_AGE_S
    if entry.is_file(follow_symlinks=False) and (match := _PARTIAL.match(entry.name)):
        return not _alive(int(match[1]))
    return False


def _unregistered_output(entry: os.DirEntry[str], is_registered: Callable[[Path], bool]) -> Path | None:
    """The output a dead process's `.registering` mark names, if the registry never got it; None otherwise."""
    output = Path(entry.path).with_name(_REGISTERING.match(entry.name)[1])  # type: ignore[index]
    return output if output.is_file() and not is_registered(output) else None


def sweep_leftovers(folder: Path, is_registered: Callable[[Path], bool] = lambda path: True) -> list[Path]:
    """Delete what dead processes left in `folder` (one listing, no recursion); return what was deleted.

    Never raises: a file that cannot be deleted now is tried again at the next start, and opening the store goes on.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    swept = []
    for entry in entries:
        try:
            if (match := _REGISTERING.match(entry.name)) and entry.is_file(follow_symlinks=False):
                if _alive(int(match[2])):
                    continue
                if (output := _unregistered_output(entry, is_registered)) is not None:
                    output.unlink()
                    swept.append(output)
                os.unlink(entry.path)
                swept.append(Path(entry.path))
                continue
            if not _abandoned(entry):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            swept.append(Path(entry.path))
        except OSError:
            continue
    return swept
