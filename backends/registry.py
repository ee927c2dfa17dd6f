"""Finds backends through the `pocketlm.backends` entry-point group, built-in ones included."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from pocketlm.backends.base import Backend
from pocketlm.models.errors import BackendUnavailable

ENTRY_POINT_GROUP = "pocketlm.backends"


@cache
def backend_classes() -> tuple[type[Backend], ...]:
    """Every registered backend class. Loading one imports its module, never its engine library."""
    found: list[type[Backend]] = []
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        found.append(entry_point.load())
    return tuple(sorted(found, key=lambda backend: backend.name))


def backend_for(model_format: str, preferred: str | None = None) -> Backend:
    """An instance of the backend that runs `model_format`: `preferred` if named, else the first installed one."""
    candidates = [backend for backend in backend_classes() if model_format in backend.formats]
    if preferred is not None:
        candidates = [backend for backend in candidates if backend.name == preferred]
        if not candidates:
            names = ", ".join(backend.name for backend in backend_classes()) or "none"
            raise BackendUnavailable(f"No backend named {preferred!r} runs {model_format} models.", f"Known backends: {names}.")
    for backend in candidates:
        if backend.is_available():
            return backend()
    if candidates:
        raise BackendUnavailable(
            f"The {candidates[0].name} backend that runs {model_format} models is not installed.", candidates[0].install_hint
        )
    hint = "See `pocketlm backends`." if model_format == "gguf" else "Pull a GGUF build of this model (`pocketlm search NAME --format gguf`), or see `pocketlm backends`."
    raise BackendUnavailable(f"No installed backend runs {model_format} models.", hint)
