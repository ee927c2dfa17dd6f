"""What `pocketlm serve` was asked for: the address, the key, and the limits every request is held to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_PORT = 11435


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None  # None: no key asked for (loopback only; see refuse_open_bind)
    idle_unload_s: float = 600.0  # a model nobody used for this long is closed, its memory freed
    max_queue: int = 8  # requests waiting for a busy model; one more gets 429
    queue_timeout_s: float = 300.0  # a waiting request gives up after this long with 503
    threads: int | None = None  # CPU threads per model (None: the engine picks)
    context_length: int | None = None  # None: the engine's default
    max_body_bytes: int = 1 << 20  # a request body over this gets 413 before it is parsed
    models: tuple[str, ...] = ()  # loaded at start (store names, prefixes or paths); others load on first request


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
