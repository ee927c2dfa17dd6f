"""Registering a LoRA adapter in the store: read and checked whole, matched to the stored model it was trained on, and
checked against that model before anything loads. `pocketlm adapter import` and an adapter named by its path in
`chat --adapter ./folder` both come through here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.models.errors import PocketError
from pocketlm.models.formats import ModelFacts, ModelFormat, inspect_model
from pocketlm.models.store import LocalModel, ModelStore, model_from_facts

if TYPE_CHECKING:
    from pocketlm.app.model_loading import ModelChoice
    from pocketlm.models.pull import PullPlan

# A GGUF in a repo without adapter_config.json whose name says nothing of LoRA, over this size, is taken for a model:
# a LoRA GGUF is tens to hundreds of megabytes, and downloading gigabytes only to refuse them afterwards is the failure.
MODEL_GGUF_BYTES = 1 << 30


def adapter_facts(path: Path) -> ModelFacts:
    """The facts of the adapter at `path` (a PEFT or mlx-lm folder, a GGUF LoRA); a model is refused with a sentence."""
    from pocketlm.models.formats import ADAPTER_FORMATS
    from pocketlm.models.peft_adapter import is_peft_adapter, read_peft_adapter

    if path.is_dir() and is_peft_adapter(path):
        read_peft_adapter(path)  # PEFT's own refusals (DoRA, other PEFT types, pickle weights) in its sentences
    facts = inspect_model(path)
    if facts.format not in ADAPTER_FORMATS:
        raise PocketError(f"{path} is a model ({facts.format}), not a LoRA adapter.",
                          "Import models with `pocketlm import`; an adapter is a folder with adapter_config.json, or a GGUF LoRA.")  # fmt: skip
    return facts


def refuse_model_repo(plan: PullPlan) -> None:
    """Refuse, before anything is downloaded, a Hub repo that is plainly not an adapter: no adapter_config.json and no
    GGUF, or a GGUF whose file names do not mention LoRA or adapter and whose size is a model's. A small GGUF of
    either kind is pulled and read (general.type), and a model refused then, with its files removed."""
    from pocketlm.models.errors import HubError
    from pocketlm.models.fit import human_bytes

    if any(f.name.rsplit("/", 1)[-1] == "adapter_config.json" for f in plan.files):
        return
    repo = plan.spec.repo_id
    if plan.gguf is None:
        raise HubError(f"{repo} holds no adapter_config.json, so it is not a PEFT adapter.",
                       "Pull models with `pocketlm pull`; an adapter repo has adapter_config.json and adapter_model.safetensors.")  # fmt: skip
    named = any(word in name.lower() for name in plan.gguf.files for word in ("lora", "adapter"))
    if not named and plan.gguf.size_bytes > MODEL_GGUF_BYTES:
        raise HubError(f"{repo}'s {plan.gguf.first_file} ({human_bytes(plan.gguf.size_bytes)}) looks like a model, not a LoRA adapter: "
                       "its name does not say LoRA or adapter, and it is the size of a model.",
                       f"Pull models with `pocketlm pull {repo}`; give `adapter import` a repo holding a PEFT adapter or a GGUF LoRA.")  # fmt: skip


def matching_base(store: ModelStore, reference: str) -> LocalModel | None:
    """The stored model an adapter's base reference (PEFT's base_model_name_or_path: a Hub repo id or a path) names:
    by store name, Hub repo id, path, or the repo's name without its owner; a checkpoint before its conversions.

    Not store.adapters_of's question: this resolves, once at import, the adapter's own free-form reference to one
    store name (loosely: "HuggingFaceTB/SmolLM2-135M" finds a model imported as "SmolLM2-135M"), which is then
    recorded as its base_model; adapters_of then matches that record exactly (name, repo id or path, up the lineage)."""
    wanted = reference.strip().rstrip("/")
    if not wanted:
        return None
    tail = wanted.rsplit("/", 1)[-1].lower()
    models = [m for m in store.list() if not m.is_adapter]
    exact = [m for m in models if wanted in (m.name, m.repo_id, str(m.path).rstrip("/"))]
    loose = [m for m in models if tail in (m.name.lower(), m.name.lower().rsplit("/", 1)[-1], m.repo_id.lower().rsplit("/", 1)[-1])]
    found = exact or loose
    # A checkpoint is what the adapter was trained on; its GGUF children were made from it.
    found.sort(key=lambda m: (m.format != ModelFormat.SAFETENSORS, m.parent is not None, m.name))
    return found[0] if found else None


def check_against(adapter_format: str, path: Path, base: LocalModel | ModelChoice) -> None:
    """A PEFT or mlx-lm adapter checked against `base`'s files (layers, modules, widths); a GGUF LoRA is checked by
    llama.cpp when attached."""
    from pocketlm.models.adapter_fit import check_adapter_fits
    from pocketlm.models.mlx_adapter import read_mlx_adapter
    from pocketlm.models.peft_adapter import read_peft_adapter

    if adapter_format == ModelFormat.PEFT_LORA:
        check_adapter_fits(read_peft_adapter(path), base.path, base.name)
    elif adapter_format == ModelFormat.MLX_LORA:
        check_adapter_fits(read_mlx_adapter(path), base.path, base.name)


def register_adapter(store: ModelStore, path: Path, source: str, name: str | None, base: LocalModel | None,
                     unique_name: bool = False, check: bool = True, **origin: object) -> LocalModel:  # fmt: skip
    """Check the adapter at `path` and register it under `name` (default: its folder or file name) with its base model:
    `base`, else the stored model its files name. With `check`, a PEFT adapter that does not fit that base is refused.
    `unique_name` picks a free name ("x-2") instead of refusing one another model has."""
    path = Path(path).expanduser().absolute()
    facts = adapter_facts(path)
    base = base or matching_base(store, facts.base_model)
    if base is not None and check:
        check_against(str(facts.format), path, base)
    wanted = name or (path.stem if path.is_file() else path.name)
    wanted = _free_name(store, wanted, path, unique_name)
    model = model_from_facts(wanted, facts, source, **origin)
    # Recorded as the store name when the base is stored: the Models screen lists the adapter under that model.
    return store.add(replace(model, base_model=base.name) if base is not None else model)


def _free_name(store: ModelStore, wanted: str, path: Path, unique_name: bool) -> str:
    existing = store.get(wanted)
    if existing is None or existing.path == path:
        return wanted
    if not unique_name:
        raise PocketError(f"There is already a model named {wanted!r} ({existing.path}).", "Choose another with --name.")
    number = 2
    while (other := store.get(f"{wanted}-{number}")) is not None and other.path != path:
        number += 1
    return f"{wanted}-{number}"


def adopt_pulled(store: ModelStore, pulled: LocalModel, name: str | None, base: LocalModel | None) -> LocalModel:
    """An adapter `pocketlm pull` just registered under its repo id, checked as an import is, its base recorded and,
    with `name`, renamed. Anything refused is removed again, with the files the pull downloaded."""
    from pocketlm.models.removal import remove_model

    try:
        facts = adapter_facts(pulled.path)
        base = base or matching_base(store, facts.base_model)
        if base is not None:
            check_against(str(facts.format), pulled.path, base)
        wanted = name or pulled.name
        if wanted != pulled.name:
            _free_name(store, wanted, pulled.path, unique_name=False)
    except BaseException:
        remove_model(store, pulled)
        raise
    adopted = replace(pulled, name=wanted, format=str(facts.format), base_model=base.name if base is not None else facts.base_model)
    stored = store.add(adopted)
    if wanted != pulled.name:
        store.remove(pulled.name)
    return stored
