"""The Hugging Face Hub through `huggingface_hub`: search, a repo's file listing, and one sentence per failure.

Settings are read from the environment at each call (not at import, as `huggingface_hub.constants` does), so
`HF_ENDPOINT`, `HF_HOME` and `HF_HUB_OFFLINE` set after start-up are honoured.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

from pocketlm.models.errors import HubError, HubUnreachable
from pocketlm.models.gguf_quants import GGUFChoice, gguf_choices

DEFAULT_ENDPOINT = "https://huggingface.co"
SearchSort = Literal["downloads", "likes", "updated"]
SEARCH_FORMATS = ("gguf", "mlx", "gptq", "safetensors")
_SORT_KEYS = {"downloads": "downloads", "likes": "likes", "updated": "lastModified"}  # the Hub API's names
_API_TIMEOUT_S = 30
# What the Hub accepts as a repo name: letters, digits, "-", "_", "." (not first or last, no "--" or ".."), at most 96
# characters, as owner/name.
_REPO_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$", re.ASCII)
# A checksum or commit id becomes a file or folder name in the cache: a short token that cannot leave its folder.
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The cache `huggingface_hub` and transformers use, so every tool shares the downloaded files."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


def repo_cache_dir(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path inside the repo
    size: int
    sha256: str | None  # LFS files: the content's sha256
    git_oid: str | None  # other files: the git blob id (sha1 of "blob <size>\0" + content)

    @property
    def etag(self) -> str:
        """The name `huggingface_hub` gives this file's blob in the cache."""
        return self.sha256 or self.git_oid or ""


@dataclass(frozen=True)
class RemoteRepo:
    repo_id: str
    revision: str  # what the user asked for: "main", a tag, a branch or a commit
    commit: str
    files: tuple[RemoteFile, ...]
    from_cache: bool = False  # listed from the local cache (offline): sizes only, no checksums

    def file(self, name: str) -> RemoteFile | None:
        return next((f for f in self.files if f.name == name), None)


@dataclass(frozen=True)
class SearchResult:
    repo_id: str
    downloads: int
    likes: int
    last_modified: datetime | None
    formats: tuple[str, ...]
    gated: bool
    gguf_files: tuple[GGUFChoice, ...] = ()  # for GGUF repos: each quant with its size


@contextmanager
def hub_errors(repo_id: str = "", revision: str | None = None, filename: str | None = None) -> Iterator[None]:
    """Turn what `huggingface_hub` and its HTTP client raise into one sentence for the user."""
    import httpx2
    from huggingface_hub import errors

    endpoint = hub_endpoint()
    login_hint = "Log in with `hf auth login` or set HF_TOKEN."
    try:
        yield
    except errors.GatedRepoError:
        raise HubError(f"{repo_id} is gated: its authors ask you to accept their conditions first.",
                       f"Accept them at {endpoint}/{repo_id}, then log in with `hf auth login` or set HF_TOKEN.") from None  # fmt: skip
    except errors.RepositoryNotFoundError:
        raise HubError(f"No model {repo_id!r} on the Hub, or it is private and you are not logged in with access to it.",
                       f"Check the name (`pocketlm search`). {login_hint}") from None  # fmt: skip
    except errors.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no branch, tag or commit {revision!r}.", f"See {endpoint}/{repo_id}/tree/main.") from None
    except errors.RemoteEntryNotFoundError:
        raise _missing_file(repo_id, revision, filename) from None
    except errors.OfflineModeIsEnabled:
        raise HubError(f"HF_HUB_OFFLINE is set and {repo_id or 'this'} is not in the local cache ({hub_cache_dir()}).",
                       "Unset HF_HUB_OFFLINE to download it.") from None  # fmt: skip
    except errors.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        if status in (401, 403):
            raise HubError(f"The Hub refused access to {repo_id} (HTTP {status}); your token may be invalid or expired.", login_hint) from None
        if status == 404 and filename:  # the file's URL (or its CDN location) answers 404 without the Hub's error code
            raise _missing_file(repo_id, revision, filename) from None
        raise HubError(f"The Hub answered HTTP {status} for {repo_id or endpoint}.", "Try again in a moment.") from None
    except (httpx2.TransportError, ConnectionError) as error:
        raise HubUnreachable(f"Cannot reach the Hugging Face Hub at {endpoint} ({type(error).__name__}).",
                       "Check your network connection; with HF_HUB_OFFLINE=1, pocketlm uses only the local cache.") from None  # fmt: skip
    except errors.HFValidationError:
        raise HubError(f"{repo_id!r} is not a valid Hub repo name.", "Write it as owner/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.") from None
    except (httpx2.HTTPError, errors.FileMetadataError, ValueError, TypeError, KeyError, AttributeError) as error:
        # A login page or a proxy's error page in place of the Hub's JSON, a redirect loop, missing Hub headers; JSON
        # of another shape than the Hub's (a list for an object, a number for a name) fails in the parsing.
        raise HubError(f"{endpoint} did not answer like the Hugging Face Hub ({type(error).__name__}).",
                       "A proxy or captive portal may be in the way: open a web page to check, or set HF_ENDPOINT.") from None  # fmt: skip


def _missing_file(repo_id: str, revision: str | None, filename: str | None) -> HubError:
    revision = revision or "main"
    return HubError(f"{repo_id} lists {filename!r}, but the Hub has no such file at revision {revision}.",
                    f"Pick another file or quant; see {hub_endpoint()}/{repo_id}/tree/{revision}.")  # fmt: skip


def is_repo_id(text: object) -> bool:
    """Whether `text` is a repo name the Hub would accept (owner/name)."""
    return isinstance(text, str) and _REPO_ID.match(text) is not None


def checked_file_name(repo_id: str, name: str) -> str:
    """`name` if it is a plain relative path that stays inside a folder; a hostile repo's file list is refused."""
    components = name.split("/")
    # A drive ("C:x") or a backslash is a path on Windows; control characters (NUL above all) are never a file name.
    hostile = (
        not name or "\\" in name or any(unicodedata.category(c) == "Cc" for c in name)
        or any(c in ("", ".", "..") for c in components) or re.match(r"[A-Za-z]:", name)
    )  # fmt: skip
    if hostile:
        raise HubError(f"{repo_id} lists a file named {name!r}, which is not a safe path inside its folder; the repo is refused and nothing was written.",
                       "Pull from another repo, or report this one to its authors.")  # fmt: skip
    return name


def checked_size(repo_id: str, name: str, size: object) -> int:
    """A file's size from the Hub, if it is a whole number of bytes a disk could hold (below 2^53: 8 PiB)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**53:
        raise HubError(f"{repo_id} gives the size of {name!r} as {size!r}, which is not a number of bytes; the repo is refused and nothing was written.",
                       "Pull from another repo, or try again later.")  # fmt: skip
    return size


def checked_token(repo_id: str, what: str, value: str | None) -> str | None:
    """A checksum, ETag or commit id from the Hub, without quotes or W/, if it is a short token of safe characters."""
    if value is None:
        return None
    token = value.strip()
    token = token.removeprefix("W/").strip('"')
    if not _SAFE_TOKEN.fullmatch(token):
        shown = token if len(token) <= 80 else token[:80] + "…"
        raise HubError(f"{repo_id} gives {what} as {shown!r}, which is not a plain id of letters and digits; the repo is refused and nothing was written.",
                       "Pull from another repo, or try again later.")  # fmt: skip
    return token


def search_models(query: str, format: str | None = None, sort: SearchSort = "downloads", limit: int = 20) -> list[SearchResult]:
    """Models on the Hub matching `query`; GGUF repos come with their quant files and sizes."""

    if hub_offline():
        raise HubError("Cannot search the Hub while HF_HUB_OFFLINE is set.", "Unset HF_HUB_OFFLINE, or see your local models with `pocketlm ls`.")
    from huggingface_hub.hf_api import ModelInfo
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    _quiet_library_logs()
    # One request, as `HfApi.list_models` makes it, but without its five retries with backoff: a search with no
    # network must say so in a second, not after 25.
    params = {"search": query or None, "filter": format or None, "sort": _SORT_KEYS[sort], "limit": limit,
              "expand": ["downloads", "likes", "lastModified", "tags", "library_name", "gated"]}  # fmt: skip
    with hub_errors():
        response = get_session().get(f"{hub_endpoint()}/api/models", params={k: v for k, v in params.items() if v}, headers=build_hf_headers(), timeout=_API_TIMEOUT_S)
        hf_raise_for_status(response)
        answer = response.json()
        if not isinstance(answer, list):
            raise TypeError("the search answer is not a list")
        # An entry without a plain repo name is left out: names are shown, and may be pulled.
        results = [_search_result(ModelInfo(**item)) for item in answer[:limit] if isinstance(item, dict) and is_repo_id(item.get("id"))]
    gguf_repos = [r.repo_id for r in results if "gguf" in r.formats]
    if not gguf_repos:
        return results
    with ThreadPoolExecutor(max_workers=8) as pool:
        choices = dict(zip(gguf_repos, pool.map(_quiet_gguf_choices, gguf_repos)))
    return [replace(r, gguf_files=tuple(choices.get(r.repo_id, ()))) for r in results]


def _search_result(info: object) -> SearchResult:
    """One search hit, its numbers and tags taken only when they are of the types the Hub gives."""
    downloads, likes = getattr(info, "downloads", 0), getattr(info, "likes", 0)
    tags = [tag for tag in getattr(info, "tags", None) or [] if isinstance(tag, str)]
    library, modified = getattr(info, "library_name", None), getattr(info, "last_modified", None)
    return SearchResult(
        getattr(info, "id"),
        downloads if isinstance(downloads, int) and not isinstance(downloads, bool) else 0,
        likes if isinstance(likes, int) and not isinstance(likes, bool) else 0,
        modified if isinstance(modified, datetime) else None,
        _formats(tags, library if isinstance(library, str) else None),
        bool(getattr(info, "gated", False)),
    )


def _quiet_library_logs() -> None:
    """pocketlm reports failures in its own words; the library's retry warnings on stderr would only repeat them."""
    from huggingface_hub.utils import logging

    logging.set_verbosity_error()


def _formats(tags: list[str], library: str | None) -> tuple[str, ...]:
    tagged = set(tags) | ({library} if library else set())
    found = [f for f in SEARCH_FORMATS if f in tagged]
    if "peft" in tagged:
        found.append("lora")
    return tuple(found)


def _quiet_gguf_choices(repo_id: str) -> list[GGUFChoice]:
    """A search result's quant files; a repo that cannot be listed (gated, just deleted) shows none instead of failing the search."""
    try:
        repo = list_repo(repo_id)
    except HubError:
        return []
    return gguf_choices((f.name, f.size) for f in repo.files)


def list_repo(repo_id: str, revision: str | None = None) -> RemoteRepo:
    """The repo's files at `revision` (default: main) with sizes and checksums; offline, what the cache holds."""
    from huggingface_hub import HfApi

    if hub_offline():
        return cached_repo(repo_id, revision)
    _quiet_library_logs()
    api = HfApi(endpoint=hub_endpoint())
    with hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=_API_TIMEOUT_S)
        # Nothing the Hub says reaches a path unchecked: names, checksums (each names a blob) and the commit (a
        # folder); an answer of another shape fails here and is said to be no Hub's answer.
        files = tuple(
            RemoteFile(
                checked_file_name(repo_id, s.rfilename),
                checked_size(repo_id, s.rfilename, s.lfs.size if s.lfs else (s.size or 0)),
                checked_token(repo_id, f"the checksum of {s.rfilename!r}", s.lfs.sha256 if s.lfs else None),
                checked_token(repo_id, f"the git id of {s.rfilename!r}", s.blob_id),
            )
            for s in info.siblings or []
        )
        commit = checked_token(repo_id, "its commit id", info.sha) or ""
    return RemoteRepo(repo_id, revision or "main", commit, files)


def cached_repo(repo_id: str, revision: str | None = None) -> RemoteRepo:
    """What the local Hub cache holds of `repo_id` at `revision`, for offline use."""
    storage = repo_cache_dir(repo_id)
    revision = revision or "main"
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        raise HubError(f"HF_HUB_OFFLINE is set and {repo_id}@{revision} is not in the local cache ({hub_cache_dir()}).",
                       "Unset HF_HUB_OFFLINE to download it.")  # fmt: skip
    files = tuple(
        RemoteFile(path.relative_to(snapshot).as_posix(), path.stat().st_size, None, None)
        for path in sorted(snapshot.rglob("*"))
        if path.is_file()
    )
    return RemoteRepo(repo_id, revision, commit, files, from_cache=True)
