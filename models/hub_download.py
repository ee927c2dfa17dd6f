"""Fetch one Hub file into the shared Hugging Face cache: resumable across runs, verified, cancellable.

`hf_hub_download` discards a partial file when a transfer fails (huggingface_hub >= 1.x names each attempt uniquely)
and never checks content against the Hub's checksums. A multi-GB GGUF on a laptop's Wi-Fi needs both, so the
transfer itself lives here; everything around it (URLs, auth headers, redirects, error types, cache layout) is
`huggingface_hub`'s. The result is an ordinary cache entry: `blobs/<etag>` plus a `snapshots/<commit>/<name>` link.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from pocketlm.models.errors import Cancelled, HubError, ModelFileError
from pocketlm.models.hub import RemoteFile, RemoteRepo, hub_endpoint, hub_errors, repo_cache_dir

PARTIAL_SUFFIX = ".pocketlm-partial"
_CHUNK_BYTES = 1 << 20
_RETRIES_WITHOUT_PROGRESS = 5


def snapshot_path(repo: RemoteRepo, file: RemoteFile) -> Path:
    return repo_cache_dir(repo.repo_id) / "snapshots" / repo.commit / file.name


def blob_path(repo: RemoteRepo, file: RemoteFile) -> Path:
    return repo_cache_dir(repo.repo_id) / "blobs" / file.etag


def partial_bytes(repo: RemoteRepo, file: RemoteFile) -> int:
    """Bytes of `file` already on disk from an earlier, interrupted pull."""
    partial = blob_path(repo, file).with_name(file.etag + PARTIAL_SUFFIX)
    return partial.stat().st_size if partial.is_file() else 0


def is_cached(repo: RemoteRepo, file: RemoteFile) -> bool:
    return snapshot_path(repo, file).is_file()


def remember_revision(repo: RemoteRepo) -> None:
    """Record which commit a branch or tag pointed at, as `huggingface_hub` does, so offline use finds it."""
    if repo.revision == repo.commit:
        return
    ref = repo_cache_dir(repo.repo_id) / "refs" / repo.revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
    temporary.write_text(repo.commit)
    os.replace(temporary, ref)


def download_file(repo: RemoteRepo, file: RemoteFile, on_bytes: Callable[[int], None], cancel: threading.Event) -> Path:
    """The cached path of `file`, fetching what is missing; `on_bytes(n)` is told of every chunk written."""
    pointer = snapshot_path(repo, file)
    if pointer.is_file():
        return pointer
    if not file.etag:
        raise HubError(f"The Hub gave no checksum for {file.name} in {repo.repo_id}, so it cannot be verified.", "Try again later.")
    blob = blob_path(repo, file)
    if not blob.is_file():
        from huggingface_hub.utils import WeakFileLock

        locks = repo_cache_dir(repo.repo_id).parent / ".locks" / repo_cache_dir(repo.repo_id).name
        locks.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(locks / f"{file.etag}.lock"):
            if not blob.is_file():
                _transfer(repo, file, blob, on_bytes, cancel)
    else:
        on_bytes(file.size)
    _link(blob, pointer)
    return pointer


def _transfer(repo: RemoteRepo, file: RemoteFile, blob: Path, on_bytes: Callable[[int], None], cancel: threading.Event) -> None:
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo.repo_id, file.name, revision=repo.commit, endpoint=hub_endpoint())
    headers = build_hf_headers()
    with hub_errors(repo.repo_id, repo.revision, file.name):
        metadata = get_hf_file_metadata(url, headers=headers, retry_on_errors=True)
    location = metadata.location
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # never hand the user's token to the storage CDN

    partial = blob.with_name(file.etag + PARTIAL_SUFFIX)
    blob.parent.mkdir(parents=True, exist_ok=True)
    hasher = _new_hasher(file)
    with partial.open("ab+") as output:
        output.seek(0)
        while chunk := output.read(_CHUNK_BYTES):  # resuming: the checksum covers the bytes already here
            hasher.update(chunk)
        have = output.tell()
        if have > file.size:
            output.truncate(0)
            have, hasher = 0, _new_hasher(file)
        on_bytes(have)
        failures = 0
        while have < file.size:
            if cancel.is_set():
                raise Cancelled(f"Stopped pulling {file.name}; {have:,} of {file.size:,} bytes are kept for next time.")
            request_headers = {**headers, "Range": f"bytes={have}-"} if have else headers
            try:
                with get_session().stream("GET", location, headers=request_headers, follow_redirects=True) as response, \
                        _closed_on(cancel, response):  # fmt: skip
                    with hub_errors(repo.repo_id, repo.revision, file.name):
                        hf_raise_for_status(response)
                    if have and response.status_code != 206:  # the server ignored the range: start again
                        output.truncate(0)
                        have, hasher = 0, _new_hasher(file)
                    for chunk in response.iter_bytes(_CHUNK_BYTES):
                        output.write(chunk)
                        hasher.update(chunk)
                        have += len(chunk)
                        failures = 0
                        on_bytes(len(chunk))
                        if have > file.size or cancel.is_set():
                            break
            except Exception as error:
                if cancel.is_set():
                    continue  # the watcher closed the stream under us: the loop's top reports the cancel
                if isinstance(error, OSError) and not isinstance(error, ConnectionError):
                    raise _disk_error(error, blob.parent) from None
                if not isinstance(error, (httpx2.TransportError, ConnectionError)):
                    raise
                failures += 1
                if failures > _RETRIES_WITHOUT_PROGRESS:
                    output.flush()
                    raise HubError(
                        f"The connection kept dropping while pulling {file.name} ({type(error).__name__}); {have:,} bytes are kept.",
                        "Run the same pull again to resume.",
                    ) from None
                time.sleep(min(0.2 * 2**failures, 5))
            if have == file.size or have > file.size:
                break
        output.flush()
        os.fsync(output.fileno())
    digest = hasher.hexdigest()
    expected = file.sha256 or file.git_oid
    if have != file.size or digest != expected:
        partial.unlink(missing_ok=True)
        raise ModelFileError(
            f"{file.name} from {repo.repo_id} failed verification (expected {file.size:,} bytes with checksum {expected}, "
            f"got {have:,} bytes with {digest}); the download was discarded.",
            "Pull again; if it fails again, the file on the Hub or a proxy in between is damaged.",
        )
    os.replace(partial, blob)


def _new_hasher(file: RemoteFile) -> hashlib._Hash:
    """sha256 of the content for LFS files; for the others git's blob id, sha1 over a "blob <size>" header and the content."""
    return hashlib.sha256() if file.sha256 else hashlib.sha1(f"blob {file.size}\0".encode())


@contextmanager
def _closed_on(cancel: threading.Event, response: object) -> Iterator[None]:
    """Close `response` as soon as `cancel` is set, so a cancel takes effect even while the server sends nothing."""
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
    temporary = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
    temporary.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), temporary)
    except OSError:  # no symlinks here (some Windows setups): a copy, as huggingface_hub does then
        shutil.copyfile(blob, temporary)
    os.replace(temporary, pointer)


def _disk_error(error: OSError, where: Path) -> Exception:
    import errno

    if error.errno == errno.ENOSPC:
        from pocketlm.models.errors import NotEnoughDisk

        return NotEnoughDisk(f"The disk holding {where} filled up during the download.", "Free some space, then pull again to resume.")
    return HubError(f"Cannot write to {where}: {error.strerror or error}.", "Check that the Hugging Face cache (HF_HOME) is writable.")
