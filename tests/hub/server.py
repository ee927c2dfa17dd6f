"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests that drive the real `huggingface_hub` client.

It serves the endpoints the client calls for what pocketlm does, with the headers the Hub sends:
- `GET /api/models` (search: search, filter, sort, limit, expand),
- `GET /api/models/{repo}[/revision/{rev}]` (model info; `blobs=true` adds sizes, git oids and LFS sha256),
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag`; LFS files answer 302 to a CDN URL with
  `X-Linked-Etag` (the sha256) and `X-Linked-Size`, as the Hub does,
- `GET /cdn/{sha256}/{path}` with `Range` (206 + `Content-Range`),
- errors with the Hub's `X-Error-Code` header: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo.

Every transfer is logged (range asked, bytes sent), and a transfer can be cut midway, to test resuming. A repo can
state what a hostile or broken Hub would: file names that climb out of a folder, ETags and commit ids that are
paths, files it lists but does not have.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    import pytest


@dataclass
class HubFile:
    content: bytes
    lfs: bool = True  # the Hub stores weights with LFS; small text files are plain git blobs
    claimed_sha256: str | None = None  # the checksum the Hub's metadata states, when it should not match
    claimed_size: int | None = None  # the size the metadata states (a model too big for the disk)
    claimed_git_oid: str | None = None  # the git blob id the metadata states (a hostile one: "../x", too long)
    missing: bool = False  # listed in the repo's metadata, but its URL answers 404

    @property
    def sha256(self) -> str:
        return self.claimed_sha256 or hashlib.sha256(self.content).hexdigest()

    @property
    def size(self) -> int:
        return self.claimed_size if self.claimed_size is not None else len(self.content)

    @property
    def git_oid(self) -> str:
        return self.claimed_git_oid or hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    tags: list[str] = field(default_factory=list)
    library_name: str | None = None
    gated: bool = False
    downloads: int = 0
    likes: int = 0
    last_modified: str = "2026-10-01T12:00:00.000Z"
    claimed_commit: str | None = None  # the commit id the metadata states (a hostile one)

    @property
    def commit(self) -> str:
        return self.claimed_commit or hashlib.sha1(self.repo_id.encode()).hexdigest()


@dataclass(frozen=True)
class Transfer:
    path: str
    range_start: int  # 0 when no Range header was sent
    bytes_sent: int
    sent_token: bool = False  # the request carried an Authorization header


class LoopbackHub:
    """Start with `start()`; `url` goes into HF_ENDPOINT. `accepted_token` opens gated repos."""

    accepted_token = "hf_pocketlm_test_token"

    def __init__(self, repos: list[HubRepo]) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.transfers: list[Transfer] = []
        self.api_calls: list[str] = []
        self._cuts: dict[str, int] = {}
        self.ignore_range: set[str] = set()  # files served whole (200) even when a range is asked for
        self.empty_bodies: set[str] = set()  # files answered with no bytes at all
        self.raw_answers: dict[str, bytes] = {}  # API paths answered 200 with these bytes as JSON, whatever they hold
        self._stalls: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release_stalls()
        self._server.shutdown()
        self._server.server_close()

    def cut_next_transfer(self, file_name: str, after_bytes: int) -> None:
        """The next download of `file_name` sends `after_bytes` bytes, then drops the connection."""
        self._cuts[file_name] = after_bytes

    def stall_transfers(self, file_name: str) -> threading.Event:
        """Downloads of `file_name` send their first MiB, then wait until the returned event is set."""
        gate = self._stalls[file_name] = threading.Event()
        return gate

    def release_stalls(self) -> None:
        for gate in self._stalls.values():
            gate.set()
        self._stalls.clear()

    def transfers_of(self, file_name: str) -> list[Transfer]:
        return [t for t in self.transfers if t.path.endswith("/" + file_name)]

    def _record(self, transfer: Transfer) -> None:
        with self._lock:
            self.transfers.append(transfer)


def _handler_for(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        # --- plumbing -------------------------------------------------------------------------------------
        def _send(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
            self.end_headers()
            if not head and body:
                self.wfile.write(body)

        def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
            self._send(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode())

        def _error(self, status: int, code: str, message: str, head: bool = False, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), head=head)

        def _authorised(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {hub.accepted_token}"

        # --- routes ---------------------------------------------------------------------------------------
        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def _route(self, head: bool) -> None:
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            hub.api_calls.append(f"{self.command} {path}")
            if path in hub.raw_answers:
                return self._send(200, {"Content-Type": "application/json"}, hub.raw_answers[path], head)
            if path == "/api/models":
                return self._search(query)
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?", path):
                return self._model_info(match[1], match[2] or "main", "true" in query.get("blobs", []))
            if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(match[1], match[2], match[3], head)
            if match := re.fullmatch(r"/cdn/([0-9a-f]{64})/([^/]+/[^/]+)/(.+)", path):
                return self._cdn(match[1], match[2], match[3], head)
            self._error(404, "NotFound", f"no route for {path}")

        def _search(self, query: dict[str, list[str]]) -> None:
            text = (query.get("search") or [""])[0].lower()
            filters = query.get("filter", [])
            repos = [r for r in hub.repos.values() if text in r.repo_id.lower() and all(f in r.tags for f in filters)]
            sort = (query.get("sort") or ["downloads"])[0]
            key = {"downloads": lambda r: r.downloads, "likes": lambda r: r.likes, "lastModified": lambda r: r.last_modified}
            repos.sort(key=key.get(sort, key["downloads"]), reverse=True)
            limit = int((query.get("limit") or ["1000"])[0])
            self._json(200, [self._summary(r) for r in repos[:limit]])

        def _summary(self, repo: HubRepo) -> dict[str, object]:
            return {"id": repo.repo_id, "_id": repo.commit[:24], "downloads": repo.downloads, "likes": repo.likes,
                    "lastModified": repo.last_modified, "tags": repo.tags, "library_name": repo.library_name,
                    "gated": "manual" if repo.gated else False, "private": False}  # fmt: skip

        def _model_info(self, repo_id: str, revision: str, blobs: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                # The Hub answers 401, not 404, for a repo that does not exist (or is private), to an anonymous client.
                return self._error(401, "RepoNotFound", "Repository not found")
            if revision not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            siblings = []
            for name, file in sorted(repo.files.items()):
                sibling: dict[str, object] = {"rfilename": name}
                if blobs:
                    sibling.update(size=file.size, blobId=file.git_oid)
                    if file.lfs:
                        sibling["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
                siblings.append(sibling)
            self._json(200, {**self._summary(repo), "sha": repo.commit, "siblings": siblings})

        def _resolve(self, repo_id: str, revision: str, file_name: str, head: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(401, "RepoNotFound", "Repository not found", head)
            if revision not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            if repo.gated and not self._authorised():
                return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted.", head)
            file = repo.files.get(file_name)
            if file is None or file.missing:
                return self._error(404, "EntryNotFound", f"{file_name} does not exist", head, commit=repo.commit)
            headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
            if file.lfs:
                # The Hub's CDN is another host: "localhost" rather than 127.0.0.1 makes this one another origin, so
                # clients must not follow it as a Hub redirect nor send it the user's token.
                port = self.server.server_address[1]
                location = f"http://localhost:{port}/cdn/{hashlib.sha256(file.content).hexdigest()}/{quote(repo_id)}/{quote(file_name)}"
                headers.update({"Location": location, "ETag": f'"{file.git_oid}"', "X-Linked-Etag": f'"{file.sha256}"',
                                "X-Linked-Size": str(file.size)})  # fmt: skip
                return self._send(302, headers, head=True)
            headers["ETag"] = f'"{file.git_oid}"'
            if head:
                return self._send(200, {**headers, "Content-Length": str(len(file.content))}, head=True)
            self._body(f"{repo_id}/{file_name}", file.content)

        def _cdn(self, sha256: str, repo_id: str, file_name: str, head: bool) -> None:
            file = hub.repos[repo_id].files.get(file_name) if repo_id in hub.repos else None
            if file is None or hashlib.sha256(file.content).hexdigest() != sha256:
                return self._send(404, {}, b"no such object")
            if head:
                return self._send(200, {"Content-Length": str(len(file.content))}, head=True)
            self._body(f"{repo_id}/{file_name}", file.content)

        def _body(self, label: str, content: bytes) -> None:
            start = 0
            file_name = label.split("/", 2)[2]
            if file_name in hub.empty_bodies:
                hub._record(Transfer(label, 0, 0))
                return self._send(200, {"Content-Type": "application/octet-stream"})
            if file_name in hub.ignore_range:
                self.send_response(200)
            elif match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start = int(match[1])
                if start >= len(content):
                    return self._send(416, {"Content-Range": f"bytes */{len(content)}"})
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            else:
                self.send_response(200)
            payload = content[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            cut = hub._cuts.pop(file_name, None)
            stall = hub._stalls.get(file_name)
            sent = 0
            try:
                if cut is not None:
                    self.wfile.write(payload[:cut])
                    sent = min(cut, len(payload))
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if stall is not None:
                    first = payload[: 1 << 20]
                    self.wfile.write(first)
                    self.wfile.flush()
                    sent = len(first)
                    stall.wait(30)
                    payload = payload[sent:]
                for offset in range(0, len(payload), 1 << 20):
                    chunk = payload[offset : offset + (1 << 20)]
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                hub._record(Transfer(label, start, sent, "Authorization" in self.headers))

    return Handler


@contextmanager
def serving(repos: list[HubRepo], hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    """A LoopbackHub for `repos` with HF_ENDPOINT pointing at it, an empty HF cache in `hf_home` and no token or offline
    switch from the environment the tests run in."""
    hub = LoopbackHub(repos).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield hub
    finally:
        hub.stop()
