"""Fetch one Hub file into the shared Hugging Face cache: resumable across runs, verified, cancellable.

`hf_hub_download` discards a partial file when a transfer fails (huggingface_hub >= 1.x names each attempt uniquely)
and never checks content against the Hub's checksums. A multi-GB GGUF on a laptop's Wi-Fi needs both, so the
transfer itself lives here; everything around it (URLs, auth headers, redirects, error types, cache layout) is
`huggingface_hub`'s. The result is an ordinary cache entry: `blobs/<etag>` plus a `snapshots/<commit>/<name>` link.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from pocketlm.models.durable import NO_ROOM_ERRNOS, durable_replace, fsync_path
from pocketlm.models.errors import Cancelled, HubError, HubUnreachable, ModelFileError, NotEnoughDisk
from pocketlm.models.hub import RemoteFile, RemoteRepo, hub_endpoint, hub_errors, repo_cache_dir
from pocketlm.models.leftovers import partial_name, sweep_leftovers

PARTIAL_SUFFIX = ".pocketlm-partial"
_CHUNK_BYTES = 1 << 20
_ATTEMPTS_WITHOUT_PROGRESS = 5
_CONTENT_RANGE_START = re.compile(r"bytes (\d+)-")
_RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
_LOCK_POLL_S = 0.25
# How long another process may hold a file's download lock while its download does not grow (a stalled network).
_LOCK_PATIENCE_S = 180


@dataclass(frozen=True)
class CachedFile:
    path: Path  # the snapshot link
    fetched: bool  # downloaded (or finished) by this call, rather than found in the cache


def snapshot_path(repo: RemoteRepo, file: RemoteFile) -> Path:
    return _inside_repo_cache(repo, repo_cache_dir(repo.repo_id) / "snapshots" / repo.commit / file.name)


def blob_path(repo: RemoteRepo, file: RemoteFile) -> Path:
    return _inside_repo_cache(repo, repo_cache_dir(repo.repo_id) / "blobs" / file.etag)


def partial_path(repo: RemoteRepo, file: RemoteFile) -> Path:
    return blob_path(repo, file).with_name(file.etag + PARTIAL_SUFFIX)


def partial_bytes(repo: RemoteRepo, file: RemoteFile) -> int:
    """Bytes of `file` already on disk from an earlier, interrupted pull."""
    partial = partial_path(repo, file)
    return partial.stat().st_size if partial.is_file() else 0


def is_cached(repo: RemoteRepo, file: RemoteFile) -> bool:
    return snapshot_path(repo, file).is_file()


def remember_revision(repo: RemoteRepo) -> None:
    """Record which commit a branch or tag pointed at, as `huggingface_hub` does, so offline use finds it."""
    if repo.revision == repo.commit:
        return
    ref = _inside_repo_cache(repo, repo_cache_dir(repo.repo_id) / "refs" / repo.revision)
    with _cache_writes(ref.parent):
        ref.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(ref.parent)  # a temporary of a pull killed right here
        temporary = ref.with_name(partial_name(ref.name, os.getpid()))
        temporary.write_text(repo.commit)
        durable_replace(temporary, ref)


def download_file(repo: RemoteRepo, file: RemoteFile, on_bytes: Callable[[int], None], cancel: threading.Event,
                  on_wait: Callable[[str], None] = lambda message: None) -> CachedFile:  # fmt: skip
    """`file` in the cache, fetching what is missing; `on_bytes(n)` hears of every chunk (and of bytes already here).

    `on_wait` hears a sentence when another process is fetching the same file and this one waits for it.
    """
    pointer = snapshot_path(repo, file)
    if pointer.is_file():
        on_bytes(file.size)
        return CachedFile(pointer, fetched=False)
    if not file.etag:
        raise HubError(f"The Hub gave no checksum for {file.name} in {repo.repo_id}, so it cannot be verified.", "Try again later.")
    blob = blob_path(repo, file)
    fetched = False
    with _cache_writes(blob.parent):
        if not blob.is_file():
            with _blob_lock(repo, file, cancel, on_wait):
                if not blob.is_file():
                    _transfer(repo, file, blob, on_bytes, cancel)
                    fetched = True
        if not fetched:
            on_bytes(file.size)
        _link(blob, pointer)
    return CachedFile(pointer, fetched)


@contextmanager
def _blob_lock(repo: RemoteRepo, file: RemoteFile, cancel: threading.Event, on_wait: Callable[[str], None]) -> Iterator[None]:
    """The lock `huggingface_hub` takes on the same blob, so two downloads of one file never write it at once.

    Taken by polling rather than one blocking call: a cancel stops the wait at once, the user hears why nothing
    moves, and a holder that makes no progress for `_LOCK_PATIENCE_S` is given up on with a sentence.
    """
    from filelock import FileLock, Timeout  # falls back to a soft lock where the file system has no flock

    storage = repo_cache_dir(repo.repo_id)
    locks = storage.parent / ".locks" / storage.name
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(locks / f"{file.etag}.lock", mode=0o664)  # group-writable, as huggingface_hub makes it
    waited_since: float | None = None
    seen = (-1, 0.0)  # the holder's bytes on disk, and when they last changed
    while True:
        try:
            lock.acquire(timeout=_LOCK_POLL_S)
            break
        except Timeout:
            pass
        now = time.monotonic()
        if cancel.is_set():
            raise Cancelled(f"Stopped waiting for another pocketlm that is pulling {file.name}; nothing of it was fetched by this one.")
        if waited_since is None:
            waited_since = now
            on_wait(f"Another pocketlm is pulling {file.name}; waiting…")
        # The holder's partial file (pocketlm's, or huggingface_hub's .incomplete) growing means it is making progress.
        held = _bytes_being_fetched(blob_path(repo, file).parent, file.etag)
        if held != seen[0]:
            seen = (held, now)
        elif now - seen[1] > _LOCK_PATIENCE_S:
            raise HubError(f"Another pocketlm has been pulling {file.name} for {(now - waited_since) / 60:.0f} minutes and has made no progress "
                           f"for {_LOCK_PATIENCE_S // 60} minutes.", "Stop the other pull (or let it finish), then pull again.")  # fmt: skip
    try:
        yield
    finally:
        lock.release()


def _bytes_being_fetched(blobs: Path, etag: str) -> int:
    total = 0
    for path in blobs.glob(f"{etag}.*"):  # the etag is checked: letters, digits, ".", "_" and "-", no pattern characters
        try:
            total += path.stat().st_size
        except OSError:  # renamed into place between the listing and the stat
            pass
    return total


def _transfer(repo: RemoteRepo, file: RemoteFile, blob: Path, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
    """Fill `blob`'s partial file from the Hub, resuming where it stopped, then verify it and move it into place."""
    partial = partial_path(repo, file)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("ab+") as output:
        state = _Partial(output, file)
        on_bytes(state.have)
        fruitless_attempts = 0
        while state.have < file.size:
            if cancel.is_set():
                raise Cancelled(f"Stopped pulling {file.name}; {state.have:,} of {file.size:,} bytes are kept for next time.")
            before = state.have
            try:
                _attempt(repo, file, state, on_bytes, cancel)
            except _Retryable as error:
                if cancel.is_set():
                    continue  # the watcher closed the stream under us: the loop's top reports the cancel
                reason = str(error)
            else:
                reason = "the server ended the transfer early"
            if state.have > before:
                fruitless_attempts = 0
                continue
            fruitless_attempts += 1
            if fruitless_attempts > _ATTEMPTS_WITHOUT_PROGRESS:
                raise HubError(f"Pulling {file.name} made no progress after {fruitless_attempts} tries ({reason}); {state.have:,} bytes are kept.",
                               "Check your connection, then run the same pull again to resume.")  # fmt: skip
            time.sleep(min(0.25 * 2**fruitless_attempts, 8))
        output.flush()
        os.fsync(output.fileno())
    digest, expected, have = state.hasher.hexdigest(), file.sha256 or file.git_oid, state.have
    if have != file.size or digest != expected:
        partial.unlink(missing_ok=True)
        raise ModelFileError(
            f"{file.name} from {repo.repo_id} failed verification (expected {file.size:,} bytes with checksum {expected}, "
            f"got {have:,} bytes with {digest}); the download was discarded.",
            "Pull again; if it fails again, the file on the Hub or a proxy in between is damaged.",
        )
    os.replace(partial, blob)  # its data was synced above
    fsync_path(blob.parent)


class _Retryable(Exception):
    """A transfer attempt failed in a way a new attempt, resuming from the bytes on disk, may get past."""


class _Partial:
    """The partial file, its byte count and the checksum of those bytes, kept in step as chunks arrive."""

    def __init__(self, output: BinaryIO, file: RemoteFile) -> None:
        self.output, self.file = output, file
        self.hasher = _new_hasher(file)
        output.seek(0)
        while chunk := output.read(_CHUNK_BYTES):  # resuming: the checksum covers the bytes already here
            self.hasher.update(chunk)
        self.have = output.tell()
        if self.have > file.size:  # not a prefix of this file
            self.restart()

    def restart(self) -> None:
        self.output.truncate(0)
        self.output.seek(0)
        self.hasher, self.have = _new_hasher(self.file), 0

    def write(self, chunk: bytes) -> int:
        chunk = chunk[: self.file.size - self.have]  # never more than the file holds; verification judges the rest
        self.output.write(chunk)
        self.hasher.update(chunk)
        self.have += len(chunk)
        return len(chunk)


def _attempt(repo: RemoteRepo, file: RemoteFile, state: _Partial, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
    """One request for the bytes `state` lacks, written into it as they arrive."""
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo.repo_id, file.name, revision=repo.commit, endpoint=hub_endpoint())
    headers = build_hf_headers()
    try:
        with hub_errors(repo.repo_id, repo.revision, file.name):
            # Each attempt asks afresh: the storage URL it points to is signed and expires.
            location = get_hf_file_metadata(url, headers=headers).location
        if urlsplit(location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # never hand the user's token to the storage CDN
        if state.have:
            headers["Range"] = f"bytes={state.have}-"
        timeout = httpx2.Timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT, connect=constants.HF_HUB_ETAG_TIMEOUT)
        with get_session().stream("GET", location, headers=headers, follow_redirects=True, timeout=timeout) as response, \
                _interrupted_on(cancel, response):  # fmt: skip
            if response.status_code in _RETRY_STATUSES:
                raise _Retryable(f"HTTP {response.status_code}")
            with hub_errors(repo.repo_id, repo.revision, file.name):
                hf_raise_for_status(response)
            start = _range_start(response) if response.status_code == 206 else 0
            if start != state.have:  # the server ignored the range, or sent another one: start over
                on_bytes(-state.have)
                state.restart()
                if start:
                    raise _Retryable(f"the server sent bytes from {start} instead of 0")
            for chunk in response.iter_bytes(_CHUNK_BYTES):
                on_bytes(state.write(chunk))
                if state.have >= file.size or cancel.is_set():
                    break
    except (httpx2.TransportError, httpx2.StreamError, ConnectionError) as error:
        raise _Retryable(type(error).__name__) from None
    except HubUnreachable as error:
        raise _Retryable(error.message) from None
    except HubError:
        if cancel.is_set():
            raise _Retryable("cancelled") from None
        raise


def _range_start(response: object) -> int:
    match = _CONTENT_RANGE_START.match(getattr(response, "headers", {}).get("Content-Range", ""))
    return int(match[1]) if match else -1


def _new_hasher(file: RemoteFile) -> hashlib._Hash:
    """sha256 of the content for LFS files; for the others git's blob id, sha1 over a "blob <size>" header and the content."""
    return hashlib.sha256() if file.sha256 else hashlib.sha1(f"blob {file.size}\0".encode())


@contextmanager
def _interrupted_on(cancel: threading.Event, response: object) -> Iterator[None]:
    """Interrupt `response` as soon as `cancel` is set, so a cancel takes effect even while the server sends nothing."""
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.1):
            if cancel.is_set():
                _interrupt(response)
                return

    watcher = threading.Thread(target=watch, name="pull-cancel-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        finished.set()
        watcher.join()


def _interrupt(response: object) -> None:
    """Wake a read blocked on `response`'s socket: closing the response alone does not, shutting the socket down does."""
    stream = getattr(response, "extensions", {}).get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass
    else:
        response.close()  # type: ignore[attr-defined]


def _link(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(pointer.parent)  # the link of a pull killed right here
    temporary = pointer.with_name(partial_name(pointer.name, os.getpid()))
    temporary.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), temporary)
    except OSError:  # no symlinks here (some Windows setups): a copy, as huggingface_hub does then
        shutil.copyfile(blob, temporary)
    os.replace(temporary, pointer)
    fsync_path(pointer.parent)


def _inside_repo_cache(repo: RemoteRepo, path: Path) -> Path:
    """`path` if it lies inside the repo's cache folder: a second guard, behind the checks on what the Hub sends."""
    root = repo_cache_dir(repo.repo_id)
    # The folder resolved (links and ".." followed), the name kept: a snapshot entry is itself a link to its blob.
    if path.name in ("", ".", "..") or not (path.parent.resolve() / path.name).is_relative_to(root.resolve()):
        raise HubError(f"{repo.repo_id}: the Hub's answer would put a file at {path}, outside the repo's cache folder {root}; nothing was written.",
                       "Pull from another repo, or report this one to its authors.")  # fmt: skip
    return path


@contextmanager
def _cache_writes(where: Path) -> Iterator[None]:
    """Disk trouble while writing to the Hub cache, in one sentence."""
    try:
        yield
    except OSError as error:
        if isinstance(error, ConnectionError) or error.errno is None:
            raise
        if error.errno in NO_ROOM_ERRNOS:
            raise NotEnoughDisk(f"No room to write the download in {where} ({error.strerror or error}).",
                                "Free some space (or raise the file-size limit), then pull again to resume.") from None  # fmt: skip
        raise HubError(f"Cannot write to the Hugging Face cache at {where}: {error.strerror or error}.",
                       "Check that HF_HOME (or HF_HUB_CACHE) is writable.") from None  # fmt: skip
