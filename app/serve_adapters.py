"""LoRA adapters per request in `pocketlm serve`: `"adapters": [{"name", "scale"}]` resolved against the request's model
with the app's own machinery (app/adapter_loading: checked against the base, converted for its backend once and then
reused from the store), as a 400 with a sentence when one is unknown or does not fit.

A request names stored adapters only: a path would let a client make the server read, register and convert whatever
folder of its disk it names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pocketlm.app.adapter_loading import adapter_spec_for, find_adapter
from pocketlm.app.model_loading import ModelChoice, backend_name
from pocketlm.app.serve_errors import ServeError
from pocketlm.app.serve_schema import AdapterRequest
from pocketlm.backends.base import AdapterSpec
from pocketlm.models.errors import ModelNotFound, PocketError
from pocketlm.models.model_reference import looks_like_path
from pocketlm.models.store import ModelStore


def adapter_error(error: PocketError, name: str | None = None) -> ServeError:
    """`error` (an adapter that is unknown, does not fit, or that the engine refused) as the request's 400."""
    code = "adapter_not_found" if isinstance(error, ModelNotFound) else "adapter_not_applicable"
    message = error.message if name is None or name in error.message else f"{name}: {error.message}"
    return ServeError(message, error.hint, code=code, param="adapters")


def request_adapter_specs(store: ModelStore, choice: ModelChoice, requested: Sequence[AdapterRequest] | None) -> tuple[AdapterSpec, ...]:
    """The AdapterSpecs of `requested` for the model `choice`, in its backend's format (blocking: a first use converts).
    Call it holding the model's turn: two requests converting the same adapter at once would write the same files."""
    if not requested:
        return ()
    backend = backend_name(choice)
    specs = []
    for wanted in requested:
        if looks_like_path(wanted.name) or Path(wanted.name).expanduser().exists():
            raise ServeError(f"{wanted.name!r} is not the name of a stored adapter; a request names adapters by their store name, not a path.",
                             "Import the adapter on the server with `pocketlm adapter import`, then give its name.",
                             code="adapter_not_found", param="adapters")  # fmt: skip
        try:
            adapter = find_adapter(store, wanted.name)
            specs.append(adapter_spec_for(store, adapter.name, wanted.scale, backend, choice))
        except PocketError as error:
            raise adapter_error(error, wanted.name) from None
    # The same adapter named twice keeps the last scale, as `--adapter a --adapter a:0.5` does.
    return tuple({spec.name or str(spec.path): spec for spec in specs}.values())
