"""What `pocketlm ls` / `info` and the Models screen say about a stored model, written once for both."""

from __future__ import annotations

from pocketlm.models.fit import estimate_model_memory, gib, human_bytes
from pocketlm.models.store import LocalModel, ModelStore


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


def detail_rows(store: ModelStore, model: LocalModel) -> list[tuple[str, str]]:
    rows = [("Name", model.name), ("Format", model.format), ("Architecture", model.architecture),
            ("Parameters", parameters(model.parameter_count)), ("Quantization", model.quantization or "-"),
            ("Context length", f"{model.context_length:,}" if model.context_length else "?"),
            ("Size on disk", human_bytes(model.size_bytes)), ("Source", model.source)]  # fmt: skip
    if model.repo_id:
        rows.append(("Hub repo", f"{model.repo_id} at {model.revision}"))
    if model.parent:
        rows.append(("Made by", model.lineage or "conversion"))
        rows.append(("Lineage", " ← ".join([model.name, *lineage_chain(store, model)])))
    if children := store.children_of(model.name):
        rows.append(("Derived models", ", ".join(children)))
    try:
        estimate = estimate_model_memory(model)
    except Exception as error:  # noqa: BLE001 - a damaged file must not hide the rest of the facts
        rows.append(("Memory", f"unknown ({error})"))
    else:
        verdict = "fits" if estimate.fits else "does NOT fit"
        rows.append(("Memory", f"{verdict}: needs about {gib(estimate.total_bytes)} at {estimate.context_length:,} tokens of context; "
                               f"{gib(estimate.available_bytes)} available"))  # fmt: skip
    return rows
