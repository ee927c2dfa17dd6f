"""What `pocketlm ls` / `info` and the Models screen say about a stored model, written once for both."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pocketlm.models.errors import PocketError
from pocketlm.models.fit import estimate_model_memory, gib, human_bytes
from pocketlm.models.formats import read_gptq_facts
from pocketlm.models.store import LocalModel, ModelStore
from pocketlm.models.verification_record import VerificationRecord

if TYPE_CHECKING:
    from pocketlm.backends.base import Backend
    from pocketlm.backends.remote import RemoteModelInfo
    from pocketlm.models.remote_endpoints import RemoteEndpoint

DeviceLookup = Callable[["type[Backend]"], "str | None"]


@dataclass(frozen=True)
class LoadedFacts:
    """Where an open model runs, as the Chat screen knows it (the store knows only the files)."""

    backend: str
    device: str  # "CPU, 2 physical cores", "CUDA: NVIDIA H200, 139.8 GiB"
    weights: str  # what the backend holds the weights as: a GGUF or GPTQ quantization, or a torch dtype


class Alarming(str):
    """A detail value the user must not miss (a broken conversion's verdict): `info` and the Models screen show it in
    red. A str all the same, so every reader of the rows takes it as one."""


def verification_row(record: VerificationRecord | None) -> tuple[str, str]:
    """The "Verified" row: the stored verdict and its figures; broken is Alarming, with what to do."""
    from pocketlm.app.verification import verdict_line

    if record is None:
        return ("Verified", "not yet (`pocketlm verify` compares it with the model it came from)")
    value = " ".join(filter(None, [f"{verdict_line(record)}.", record.advice if record.broken else ""]))
    return ("Verified", Alarming(value) if record.broken else value)


def parameters(count: int) -> str:
    if not count:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def origin(model: LocalModel) -> str:
    """Where a model came from, in a few words: its parent and how, or its source."""
    if model.parent:
        return f"{model.lineage} of {model.parent}" if model.lineage else f"from {model.parent}"
    if model.repo_id:
        return f"Hub @{model.revision[:7]}"
    if model.source.startswith("import:"):
        return "imported"
    return model.source.replace("pypi:", "PyPI ")


def lineage_chain(store: ModelStore, model: LocalModel) -> list[str]:
    """The model's ancestors, nearest first; a removed one is named and marked."""
    chain: list[str] = []
    parent = model.parent
    while parent and len(chain) < 20:  # a cycle would be a bug elsewhere; never loop on it
        ancestor = store.get(parent)
        chain.append(parent if ancestor else f"{parent} (removed)")
        parent = ancestor.parent if ancestor else None
    return chain


def gptq_rows(model: LocalModel) -> list[tuple[str, str]]:
    """A GPTQ checkpoint's bits, group size and act-order, read by the parser the store and backends use."""
    if model.format != "gptq" or not model.path.is_dir():
        return []
    try:
        facts = read_gptq_facts(model.path)
    except PocketError:
        return []  # a damaged config: the Quantization row still says what the store read
    if facts is None:
        return []
    group = "per row (-1)" if facts.group_size == -1 else str(facts.group_size)
    return [("Bits", str(facts.bits)), ("Group size", group), ("Act-order", "yes" if facts.act_order else "no")]


_devices: dict[str, str] = {}
_devices_lock = threading.Lock()


def device_of(backend: type[Backend]) -> str:
    """Where `backend` runs on this machine ("CPU (float32), 2 cores", "CUDA: NVIDIA H200, 139.8 GiB"), asked once per
    backend and kept: asking may import torch (seconds), so the app calls this from a worker, never its UI thread.
    A backend that cannot say is "" rather than an error: the details must never cost the user the rest."""
    with _devices_lock:
        if backend.name in _devices:
            return _devices[backend.name]
    try:
        summary = backend.device_summary()
    except Exception:  # noqa: BLE001 - see above
        summary = ""
    with _devices_lock:
        return _devices.setdefault(backend.name, summary)


def known_device(backend: type[Backend]) -> str | None:
    """`device_of(backend)` if it has been asked already, else None; never blocks (for the UI thread)."""
    with _devices_lock:
        return _devices.get(backend.name)


def default_backend(model: LocalModel) -> type[Backend] | PocketError:
    """The backend that opens `model` when none is named (the registry's choice by priority), or why none can."""
    from pocketlm.backends.registry import backend_for

    try:
        return type(backend_for(model.format))
    except PocketError as refusal:
        return refusal


def opens_with(model: LocalModel, device: DeviceLookup = device_of) -> str:
    """Which backend opens `model` by default and on what device: "torch on CPU (float32), 2 cores"; `device` may
    return None for a device not known yet (the app's UI thread then shows the backend alone until it is)."""
    backend = default_backend(model)
    if isinstance(backend, PocketError):
        return f"no installed backend: {backend.message} {backend.hint}".strip()
    where = device(backend)
    if where is None:
        return f"{backend.name} (finding its device…)"
    return f"{backend.name} on {where}" if where else backend.name


def detail_rows(store: ModelStore, model: LocalModel, loaded: LoadedFacts | None = None,
                device: DeviceLookup | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """Facts about `model` for `info` and the Models screen; `loaded` adds where it runs when it is open in Chat, and
    `device` (device_of, or known_device on a UI thread) which backend would open it by default and on what device."""
    if model.is_adapter:
        from pocketlm.app.adapter_loading import bases_of_adapters

        bases = bases_of_adapters(store, store.list()).get(model.name, [])
        base = bases[0].name if bases else "MODEL"
        return [("Name", model.name), *adapter_rows(store, model, bases, use=f"pocketlm chat {base} --adapter {model.name}")]
    rows = [("Name", model.name), ("Format", model.format), ("Architecture", model.architecture),
            ("Parameters", parameters(model.parameter_count)), ("Quantization", model.quantization or "-"),
            ("Context length", f"{model.context_length:,}" if model.context_length else "?"),
            ("Size on disk", human_bytes(model.size_bytes)), ("Source", model.source)]  # fmt: skip
    rows[5:5] = gptq_rows(model)
    if model.repo_id:
        rows.append(("Hub repo", f"{model.repo_id} at {model.revision}"))
    if model.parent:
        rows.append(("Made by", model.lineage or "conversion"))
        rows.append(("Lineage", " ← ".join([model.name, *lineage_chain(store, model)])))
    verification = store.verification_of(model.name)
    if model.parent or verification is not None:  # a model with nothing to be compared with needs no "not yet"
        rows.append(verification_row(verification))
    if children := store.children_of(model.name):
        rows.append(("Derived models", ", ".join(children)))
    try:
        estimate = estimate_model_memory(model)
    except Exception as error:  # noqa: BLE001 - a damaged file must not hide the rest of the facts
        rows.append(("Memory", f"unknown ({error})"))
    else:
        verdict = "fits" if estimate.fits else "does NOT fit"
        rows.append(("Memory", f"{verdict}: needs about {gib(estimate.total_bytes)} at {estimate.context_length:,} tokens of context; "
                               f"{gib(estimate.available_bytes)} of {estimate.memory_name} available"))  # fmt: skip
    if device is not None:
        rows.append(("Opens by default with", opens_with(model, device)))
    if loaded is not None:
        rows.append(("Open in Chat", f"{loaded.backend} on {loaded.device or 'its default device'}, weights as {loaded.weights}"))
    return rows


def adapter_rows(store: ModelStore, adapter: LocalModel, bases: list[LocalModel], use: str) -> list[tuple[str, str]]:
    """What the details say about a LoRA adapter: its format, rank, base and where it came from (the memory and
    backend rows of a model mean nothing for it). `bases`: the stored models it belongs to (bases_of_adapters); `use`:
    how to attach it, in the words of the CLI or the screen."""
    rows = [("Format", adapter.format), ("Rank", adapter.quantization.removeprefix("rank ").removeprefix("ranks ") or "?"),
            ("Base model", adapter.base_model or "unknown"), ("Parameters", parameters(adapter.parameter_count)),
            ("Size on disk", human_bytes(adapter.size_bytes)), ("Source", adapter.source)]  # fmt: skip
    names = sorted(base.name for base in bases)
    rows.append(("Base in the store", ", ".join(names) if names else "none (pull or import it to list the adapter under it)"))
    if adapter.parent:
        rows.append(("Made by", adapter.lineage or "conversion"))
        rows.append(("Lineage", " ← ".join([adapter.name, *lineage_chain(store, adapter)])))
    if children := store.children_of(adapter.name):
        rows.append(("Conversions", ", ".join(children)))
    rows.append(("Use", use))
    return rows


def remote_rows(endpoint: RemoteEndpoint, model: str | None, served: Sequence[RemoteModelInfo] | PocketError | None) -> list[tuple[str, str]]:
    """What `info` and the Models screen say about a remote endpoint (`model`: the one named as ENDPOINT/MODEL):
    its address and the NAME of its key's variable, never the key. `served`: what GET /v1/models answered, the
    sentence saying why it did not, or None while it is being asked (the app asks from a worker)."""
    if endpoint.api_key_env:
        key = f"${endpoint.api_key_env} ({'set' if os.environ.get(endpoint.api_key_env) else 'not set'})"
    else:
        key = "none (the server asks for no key)"
    rows = [("Format", "remote"), ("URL", endpoint.base_url), ("Key variable", key)]
    if model is not None:
        rows.append(("Model", model))
    if served is None:
        rows.append(("Serves", "asking the server…"))
    elif isinstance(served, PocketError):
        rows.append(("Serves", Alarming(str(served))))
    else:
        listed = [f"{m.id} (context {m.context_length:,})" if m.context_length else m.id for m in served]
        rows.append(("Serves", ", ".join(listed) or "no models yet"))
    name = endpoint.name if model is None else f"{endpoint.name}/{model}"
    rows.append(("Use", f"pocketlm chat {name}; forget it with `pocketlm remote rm {endpoint.name}`"))
    return rows
