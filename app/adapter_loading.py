"""From what a user typed to name a LoRA adapter to the AdapterSpec a loaded model's backend takes.

A backend takes adapters of its own format only (Backend.adapter_formats): llama.cpp a GGUF LoRA, PyTorch a PEFT
folder, MLX an mlx-lm adapter. A PEFT adapter attached to a model on another backend is converted for that model the
first time, and the conversion is kept in the store as a child of the adapter, recorded with the base it was made
for and the identity of the adapter's files it was made from, so the next chat with the same pair converts nothing,
and a retrained adapter (new files in the same folder) is converted again. The CLI and the Chat screen both come
through here.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.backends.base import AdapterSpec
from pocketlm.models.errors import ModelNotFound, PocketError
from pocketlm.models.model_reference import looks_like_path
from pocketlm.models.peft_adapter import AdapterError
from pocketlm.models.progress import ProgressCallback, ignore_progress
from pocketlm.models.store import LocalModel, ModelStore

if TYPE_CHECKING:
    from pocketlm.app.model_loading import ModelChoice

# The source of an adapter named by a path in `chat --adapter ./folder`: registered so its conversions have a parent.
ON_THE_FLY_SOURCE = "import:"


def parse_adapter_option(text: str) -> tuple[str, float]:
    """"name" -> (name, 1.0); "name:0.5" -> (name, 0.5); a path with ':' whose tail is not a number stays whole."""
    head, colon, tail = text.rpartition(":")
    if not colon or not head:
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0  # "owner/adapter:v2", "C:\\adapters\\x": part of the name
    return head, checked_scale(scale, text)


def checked_scale(scale: float, said: str = "") -> float:
    """`scale` when it is a finite number; a sentence otherwise (NaN would poison every logit)."""
    if not math.isfinite(scale):
        raise PocketError(f"{said or scale!r}: an adapter's scale must be a finite number.", "Give e.g. NAME:0.5 (1 is the adapter as trained, 0 turns it off).")
    return scale


def stored_adapters(store: ModelStore) -> list[LocalModel]:
    """Every stored adapter that is not a cached conversion of another (what `adapter ls` and the app's picker list)."""
    models = store.list()
    adapter_names = {m.name for m in models if m.is_adapter}
    return [m for m in models if m.is_adapter and m.parent not in adapter_names]


def bases_of_adapters(store: ModelStore, models: list[LocalModel]) -> dict[str, list[LocalModel]]:
    """For each adapter in `models` (the store's list), the models of `models` it belongs to (store.adapters_of
    decides), nearest first: the model its base_model names before the ones made from it, which have that model in
    their lineage, so the fewest ancestors."""
    by_name = {m.name: m for m in models}

    def ancestors(model: LocalModel) -> int:
        count, seen = 0, {model.name}
        while model.parent in by_name and model.parent not in seen:
            model = by_name[model.parent]
            seen.add(model.name)
            count += 1
        return count

    bases: dict[str, list[LocalModel]] = {}
    for base in sorted((m for m in models if not m.is_adapter), key=lambda m: (ancestors(m), m.name.lower())):
        for adapter in store.adapters_of(base, models):
            bases.setdefault(adapter.name, []).append(base)
    return bases


def adapters_by_base(store: ModelStore, models: list[LocalModel]) -> dict[str, list[LocalModel]]:
    """Each stored adapter that is not a conversion, under the one model of `models` it is listed under (the nearest
    of bases_of_adapters: a checkpoint's adapter under the checkpoint, not under every GGUF made from it), by name.
    Adapters whose base is not among `models` are under none."""
    adapter_names = {m.name for m in models if m.is_adapter}
    adapters = {m.name: m for m in models if m.is_adapter and m.parent not in adapter_names}
    under: dict[str, list[LocalModel]] = {}
    for name, bases in sorted(bases_of_adapters(store, models).items(), key=lambda item: item[0].lower()):
        if name in adapters:
            under.setdefault(bases[0].name, []).append(adapters[name])
    return under


def conversions_of(store: ModelStore, adapter: LocalModel) -> list[LocalModel]:
    """The stored conversions of `adapter` (its adapter children), by name."""
    children = (store.get(name) for name in store.children_of(adapter.name))
    return [child for child in children if child is not None and child.is_adapter]


def find_adapter(store: ModelStore, query: str) -> LocalModel:
    """A stored adapter by name / unique prefix, or an adapter folder/file path (registered on the fly as an import, like
    models/model_reference.find_model does for models); a non-adapter model named -> PocketError sentence."""
    candidate = Path(query).expanduser()
    if candidate.exists():
        return _adapter_at(store, candidate)
    models = store.list()
    wanted = query.lower()
    named = [m for m in models if m.name == query] or [m for m in models if wanted in (m.name.lower(), m.name.lower().partition("/")[2])]
    if len(named) == 1 and named[0].is_adapter:
        return named[0]
    adapters = stored_adapters(store)
    matches = [m for m in adapters if m.name.lower().startswith(wanted) or m.name.lower().partition("/")[2].startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ModelNotFound(f"{query!r} matches several adapters: {', '.join(m.name for m in matches)}.", "Type more of the name.")
    if named:
        _only_adapter(named[0])  # a model's name: say so rather than "no adapter named"
    if looks_like_path(query):
        raise ModelNotFound(f"{query} does not exist.", "Check the path to the adapter's folder or .gguf file.")
    known = ", ".join(m.name for m in adapters) or "none yet"
    raise ModelNotFound(f"No adapter named {query!r} in the store (adapters: {known}).",
                        "Import one with `pocketlm adapter import PATH_OR_REPO`, or give the adapter's folder.")  # fmt: skip


def _only_adapter(model: LocalModel) -> LocalModel:
    if not model.is_adapter:
        raise PocketError(f"{model.name} is a model ({model.format}), not a LoRA adapter.", "Name an adapter from `pocketlm adapter ls`.")
    return model


def _adapter_at(store: ModelStore, path: Path) -> LocalModel:
    """The stored adapter at `path`, or the adapter there registered now (its files stay the user's)."""
    from pocketlm.app.adapter_import import register_adapter

    registered = store.models_at(path)
    if registered:
        return _only_adapter(registered[0])
    return register_adapter(store, path.absolute(), source=f"{ON_THE_FLY_SOURCE}{path.absolute()}", name=None, base=None, unique_name=True, check=False)


def backend_adapter_formats(backend_name: str) -> frozenset[str]:
    """The adapter formats the backend named `backend_name` takes (none for a backend that declares none)."""
    from pocketlm.backends.registry import backend_classes

    for backend in backend_classes():
        if backend.name == backend_name:
            return frozenset(getattr(backend, "adapter_formats", frozenset()))
    return frozenset()


def adapter_spec_for(store: ModelStore, query: str, scale: float, backend_name: str, base: ModelChoice,
                     on_progress: ProgressCallback = ignore_progress, cancel: threading.Event | None = None) -> AdapterSpec:  # fmt: skip
    """The adapter `query` at `scale`, in a format the backend named `backend_name` takes (registry.backend_classes()
    -> adapter_formats): itself, a cached conversion (a stored child of it of that format made for the same base), or a
    conversion made now (converters.registry.converter_for("peft-lora", fmt) with AdapterConversionSettings(base=base.path)),
    registered as a child. A PEFT adapter is checked against the base (models/adapter_fit.check_adapter_fits) first."""
    scale = checked_scale(scale)
    candidate = Path(query).expanduser()
    first_time = candidate.exists() and not store.models_at(candidate)
    if first_time:
        from pocketlm.app.adapter_import import adapter_facts, check_against

        # A folder named for the first time: one that does not fit this model is refused before it is registered.
        check_against(str(adapter_facts(candidate).format), candidate, base)
    adapter = find_adapter(store, query)
    if not first_time:  # a first-time folder was checked just above, before find_adapter registered it
        check_fits(adapter, base)
    taken = backend_adapter_formats(backend_name)
    if adapter.format in taken:
        return AdapterSpec(adapter.path, scale, adapter.name)
    target = _target_format(adapter, backend_name, taken)
    cached = cached_conversion(store, adapter, target, base)
    if cached is None:
        cached = convert_adapter(store, adapter, target, base, on_progress, cancel)
    return AdapterSpec(cached.path, scale, adapter.name)


def check_fits(adapter: LocalModel, base: ModelChoice) -> None:
    """A PEFT or mlx-lm adapter checked against the base model's files: layers, modules and widths (AdapterError, one
    sentence). A GGUF LoRA is checked by llama.cpp itself when attached."""
    from pocketlm.app.adapter_import import check_against

    check_against(adapter.format, adapter.path, base)


def _target_format(adapter: LocalModel, backend_name: str, taken: frozenset[str]) -> str:
    """The format among the backend's that `adapter` can be converted to."""
    from pocketlm.converters.base import ConversionError
    from pocketlm.converters.registry import converter_for

    if not taken:
        raise AdapterError(f"The {backend_name} backend cannot apply LoRA adapters.", "Load the model with another backend (--backend).")
    for target in sorted(taken):
        try:
            converter_for(adapter.format, target)
        except ConversionError:
            continue
        return target
    wanted = " or ".join(sorted(taken))
    raise AdapterError(f"{adapter.name} is a {adapter.format} adapter, and the {backend_name} backend takes {wanted} adapters, which pocketlm "
                       "makes only from a PEFT adapter.", "Import the adapter's PEFT folder (adapter_config.json and adapter_model.safetensors) instead.")  # fmt: skip


def conversion_name(adapter: LocalModel, target_format: str, base: ModelChoice) -> str:
    """The store name of `adapter` converted to `target_format` for `base`: "my-lora:gguf-lora@SmolLM2-135M"."""
    return f"{adapter.name}:{target_format}@{base.name}"


# The prefix of a conversion's `revision`: the identity of the adapter files it was made from (source_identity).
_FROM = "from:"


def source_identity(adapter: LocalModel) -> str:
    """The adapter's files as they are now: each one's name, size and mtime_ns, hashed. Retraining into the same folder
    rewrites adapter_model.safetensors (and adapter_config.json), which changes it; reading them whole to hash their
    bytes would cost seconds per chat for a big adapter, a stat costs nothing."""
    files: list[Path] = []
    for place in adapter.files or (adapter.path,):  # a folder recorded whole (an older store's rows) stands for its files
        files += sorted(p for p in place.iterdir() if p.is_file()) if place.is_dir() else [place]
    digest = hashlib.sha256()
    for file in sorted(files):
        try:
            stat = file.stat()
        except OSError:
            digest.update(f"{file.name}:missing\n".encode())
            continue
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return _FROM + digest.hexdigest()[:16]


def cached_conversion(store: ModelStore, adapter: LocalModel, target_format: str, base: ModelChoice) -> LocalModel | None:
    """A stored conversion of `adapter` to `target_format` made for `base` from the adapter's files as they are now
    (source_identity), whose own files are still there. One made from files since rewritten (a retrained adapter) is
    removed, with what pocketlm wrote of it: it would apply the old weights."""
    from pocketlm.models.removal import remove_model

    identity = source_identity(adapter)
    for child in conversions_of(store, adapter):
        if child.format != target_format or child.base_model != base.name:
            continue
        if child.revision == identity and child.path.exists():
            return child
        remove_model(store, child)  # stale or gone: converted again under the same name
    return None


def convert_adapter(store: ModelStore, adapter: LocalModel, target_format: str, base: ModelChoice,
                    on_progress: ProgressCallback = ignore_progress, cancel: threading.Event | None = None,
                    name: str | None = None, output: Path | None = None) -> LocalModel:  # fmt: skip
    """Convert the PEFT `adapter` to `target_format` for `base` and register it as its child, recording the base."""
    from pocketlm.converters.adapter_settings import AdapterConversionSettings
    from pocketlm.converters.base import ConvertOptions
    from pocketlm.converters.conversion_job import convert_model

    options = ConvertOptions(settings=AdapterConversionSettings(base=base.path), cancel=cancel or threading.Event())
    identity = source_identity(adapter)  # before converting: a file rewritten meanwhile makes the next use convert again
    converted = convert_model(store, adapter, target_format, options, on_progress, name=name or conversion_name(adapter, target_format, base), output=output)
    # The base and the source's identity are what make a conversion reusable: the same adapter for another model, or
    # retrained since, is another file.
    return store.add(replace(converted, base_model=base.name, revision=identity, lineage=f"{converted.lineage}, on {base.name}"))
