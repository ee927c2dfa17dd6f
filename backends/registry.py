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


def loaders_for(model_format: str, known: tuple[type[Backend], ...] | None = None) -> list[type[Backend]]:
    """The backends that load `model_format`, installed or not, the default first: lowest priority, ties by name."""
    known = backend_classes() if known is None else known
    return sorted((b for b in known if model_format in b.formats), key=lambda b: (b.priority(model_format), b.name))


def backend_for(model_format: str, preferred: str | None = None, known: tuple[type[Backend], ...] | None = None) -> Backend:
    """An instance of the backend that runs `model_format`: `preferred` if named, else the installed one of lowest
    priority for the format (ties by name). `known` replaces the registered backends (for tests)."""
    known = backend_classes() if known is None else known
    loaders = loaders_for(model_format, known)
    if preferred is not None:
        return _preferred(model_format, preferred, known, loaders)
    for backend in loaders:
        if backend.is_available():
            return backend()
    if loaders:
        raise BackendUnavailable(f"No installed backend loads {model_format} models.", "Install one: " + _with_hints(loaders))
    hint = "See `pocketlm backends`."
    if model_format != "gguf":
        hint = "Pull a GGUF build of this model (`pocketlm search NAME --format gguf`), or see `pocketlm backends`."
    raise BackendUnavailable(f"No backend runs {model_format} models.", hint)


def _preferred(model_format: str, name: str, known: tuple[type[Backend], ...], loaders: list[type[Backend]]) -> Backend:
    named = [backend for backend in known if backend.name == name]
    if not named:
        names = ", ".join(backend.name for backend in known) or "none"
        raise BackendUnavailable(f"No backend is named {name!r}.", f"Known backends: {names}.")
    backend = named[0]
    if model_format not in backend.formats:
        others = f"Backends that load {model_format} models: {_with_hints(loaders)}." if loaders else f"No backend loads {model_format} models."
        raise BackendUnavailable(f"The {backend.name} backend loads {_listing(sorted(backend.formats))} models, not {model_format}.", others)
    if not backend.is_available():
        raise BackendUnavailable(f"The {backend.name} backend is not installed.", backend.install_hint)
    return backend()


def _with_hints(backends: list[type[Backend]]) -> str:
    """Each backend by name, with what to run to install it where it is not."""
    return "; ".join(backend.name if backend.is_available() else f"{backend.name} ({backend.install_hint})" for backend in backends)


def _listing(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
