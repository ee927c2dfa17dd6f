"""Remote OpenAI-compatible endpoints (vLLM, TGI, llama-server, Ollama, pocketlm serve) the user configured once.

Only the NAME of the environment variable that holds an endpoint's API key is stored, never the key: the database
is a plain file anyone with the user's access reads. A key kept in the OS keyring (service "pocketlm", the
endpoint's name as user) is read when the optional `keyring` package is installed and the variable is not set.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.database import connect, migrate
from pocketlm.models.errors import ModelNotFound, PocketError

_MIGRATIONS = [
    """CREATE TABLE IF NOT EXISTS remote_endpoints (
        name TEXT PRIMARY KEY, base_url TEXT NOT NULL, api_key_env TEXT NOT NULL DEFAULT '', added_at REAL NOT NULL)""",
]
# A name is the first part of `NAME/MODEL` in chat/run/bench, so it cannot hold a slash; the rest keeps it typeable.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KEYRING_SERVICE = "pocketlm"


@dataclass(frozen=True)
class RemoteEndpoint:
    name: str
    base_url: str  # up to and including /v1, as the openai client's base_url takes it
    api_key_env: str = ""  # the environment variable holding the key; "" when the endpoint needs none
    added_at: float = 0.0

    def api_key(self) -> str | None:
        """The key from the environment (or the OS keyring when `keyring` is installed); None when neither has one."""
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        try:
            import keyring
        except ImportError:
            return None
        try:
            return keyring.get_password(KEYRING_SERVICE, self.name)
        except Exception:  # noqa: BLE001 - a keyring with no backend on this machine is simply no key
            return None


def normalised_base_url(url: str) -> str:
    """`url` with a scheme checked and `/v1` appended where the user gave the server's root (`http://host:8000`)."""
    url = url.strip().rstrip("/")
    if not re.match(r"https?://[^/\s]+", url):
        raise PocketError(f"{url!r} is not an http:// or https:// address.", "Give the server's address, e.g. http://127.0.0.1:8000/v1.")
    return url if re.search(r"/v\d+$", url) else url + "/v1"


def check_endpoint_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise PocketError(f"{name!r} cannot name an endpoint: use letters, digits, '.', '_' and '-' (no '/').",
                          "Choose a short name such as gpu-box.")  # fmt: skip


def check_env_var_name(name: str) -> None:
    if not _ENV_VAR.fullmatch(name):
        hint = "Give the NAME of an environment variable (e.g. VLLM_API_KEY) and set the key there: pocketlm never stores keys."
        raise PocketError(f"{name!r} is not an environment variable name.", hint)


class RemoteEndpoints:
    """The endpoints table, in pocketlm's database beside the model store."""

    def __init__(self, database: Path) -> None:
        self._connection = connect(Path(database))
        self._lock = threading.Lock()
        with self._lock:
            migrate(self._connection, "remote_endpoints", _MIGRATIONS)

    def add(self, endpoint: RemoteEndpoint) -> RemoteEndpoint:
        """Register `endpoint`, replacing one of the same name."""
        check_endpoint_name(endpoint.name)
        if endpoint.api_key_env:
            check_env_var_name(endpoint.api_key_env)
        endpoint = RemoteEndpoint(endpoint.name, normalised_base_url(endpoint.base_url), endpoint.api_key_env, endpoint.added_at or time.time())
        with self._lock:
            self._connection.execute("INSERT OR REPLACE INTO remote_endpoints VALUES (?, ?, ?, ?)",
                                     (endpoint.name, endpoint.base_url, endpoint.api_key_env, endpoint.added_at))  # fmt: skip
        return endpoint

    def list(self) -> list[RemoteEndpoint]:
        with self._lock:
            rows = self._connection.execute("SELECT * FROM remote_endpoints ORDER BY name").fetchall()
        return [RemoteEndpoint(**dict(row)) for row in rows]

    def get(self, name: str) -> RemoteEndpoint | None:
        with self._lock:
            row = self._connection.execute("SELECT * FROM remote_endpoints WHERE name = ?", (name,)).fetchone()
        return RemoteEndpoint(**dict(row)) if row else None

    def require(self, name: str) -> RemoteEndpoint:
        endpoint = self.get(name)
        if endpoint is None:
            known = ", ".join(e.name for e in self.list()) or "none yet"
            raise ModelNotFound(f"No remote endpoint named {name!r} (endpoints: {known}).", "Add it with `pocketlm remote add NAME URL`.")
        return endpoint

    def remove(self, name: str) -> None:
        self.require(name)
        with self._lock:
            self._connection.execute("DELETE FROM remote_endpoints WHERE name = ?", (name,))

    def close(self) -> None:
        self._connection.close()


REMOTE_FORMAT = "remote"  # LocalModel.format of a model served by a remote endpoint; the remote backend loads it


def remote_reference(endpoint: str, model: str | None) -> Path:
    """The synthetic LocalModel.path of `endpoint`'s `model` (None: the only one it serves): never a file on disk."""
    return Path(endpoint if model is None else f"{endpoint}/{model}")


def parse_remote_reference(reference: Path | str) -> tuple[str, str | None]:
    """(endpoint name, model id or None) from remote_reference's path; a model id may itself hold slashes."""
    endpoint, _, model = str(reference).replace("\\", "/").partition("/")
    return endpoint, model or None
