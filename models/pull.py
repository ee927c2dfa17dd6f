"""`pocketlm pull REPO[@REVISION][:QUANT_OR_FILE]`: choose exactly the files a model needs, fetch them, register it."""

from __future__ import annotations

import re
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from pocketlm.models.errors import Cancelled, HubError, ModelFileError, NotEnoughDisk
from pocketlm.models.fit import gib, human_bytes
from pocketlm.models.formats import CHECKPOINT_SIDE_FILES, checkpoint_weight_files, inspect_model
from pocketlm.models.gguf_quants import GGUFChoice, default_choice, gguf_choices
from pocketlm.models.hub import RemoteFile, RemoteRepo, hub_cache_dir, is_repo_id, list_repo
from pocketlm.models.hub_download import download_file, is_cached, partial_bytes, remember_revision, snapshot_path
from pocketlm.models.progress import ProgressCallback, ProgressUpdate, ignore_progress
from pocketlm.models.store import LocalModel, ModelStore, model_from_facts

_URL_PREFIX = re.compile(r"^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/", re.IGNORECASE)
# Pickle weights only with --allow-pickle; never the ones that duplicate safetensors weights.
_PICKLE_WEIGHTS = re.compile(r"^(pytorch_model|adapter_model|model)[\w.-]*\.bin$")


@dataclass(frozen=True)
class PullSpec:
    repo_id: str
    revision: str | None = None
    selector: str | None = None  # a quant name (Q4_K_M) or a file in the repo

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.selector}" if self.selector else "")


def parse_pull_spec(text: str) -> PullSpec:
    """`owner/repo`, `owner/repo@rev`, `owner/repo:Q4_K_M`, `owner/repo@rev:file.gguf`; hf.co/ URLs too."""
    rest = _URL_PREFIX.sub("", text.strip())
    rest, _, selector = rest.partition(":")
    repo_id, _, revision = rest.partition("@")
    repo_id = repo_id.strip("/")
    if not is_repo_id(repo_id):
        raise HubError(f"{text!r} is not a Hub model name.", "Write it as owner/name, e.g. `pocketlm pull HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M`.")
    return PullSpec(repo_id, revision or None, selector or None)


@dataclass(frozen=True)
class PullPlan:
    spec: PullSpec
    repo: RemoteRepo
    files: tuple[RemoteFile, ...]
    name: str  # the store name the model gets
    gguf: GGUFChoice | None  # the quant chosen, for GGUF repos
    other_quants: tuple[GGUFChoice, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing_bytes(self) -> int:
        """What still has to come over the network (files already cached or partly fetched count as had)."""
        return sum(f.size - partial_bytes(self.repo, f) for f in self.files if not is_cached(self.repo, f))


def plan_pull(spec: PullSpec, allow_pickle: bool = False) -> PullPlan:
    repo = list_repo(spec.repo_id, spec.revision)
    names = [f.name for f in repo.files]
    choices = gguf_choices((f.name, f.size) for f in repo.files)
    name_base = spec.repo_id + (f"@{spec.revision}" if spec.revision else "")
    if spec.selector or (choices and not checkpoint_weight_files(names)):
        choice = _choose_gguf(spec, repo, choices)
        others = tuple(c for c in choices if c != choice)
        files = tuple(f for f in repo.files if f.name in choice.files)
        return PullPlan(spec, repo, files, f"{name_base}:{choice.quant}", choice, others)
    weights = checkpoint_weight_files(names)
    if not weights:
        pickles = [n for n in names if "/" not in n and _PICKLE_WEIGHTS.match(n)]
        if not pickles:
            raise HubError(f"{spec.repo_id} has no model weights pocketlm can use (no .gguf or .safetensors files).",
                           "Pick another repo; `pocketlm search` shows each repo's formats.")  # fmt: skip
        if not allow_pickle:
            raise HubError(
                f"{spec.repo_id} has only pickle weights ({', '.join(pickles)}), and loading a pickle can run arbitrary code.",
                "Look for a safetensors or GGUF version of this model, or pass --allow-pickle if you trust its authors.",
            )
        weights = pickles
    wanted = set(weights) | (CHECKPOINT_SIDE_FILES & set(names))
    files = tuple(f for f in repo.files if f.name in wanted)
    return PullPlan(spec, repo, files, name_base, None)


def _choose_gguf(spec: PullSpec, repo: RemoteRepo, choices: list[GGUFChoice]) -> GGUFChoice:
    if not choices:
        raise HubError(f"{spec.repo_id} has no GGUF files to pick {spec.selector!r} from.", f"Pull it without `:{spec.selector}` to get its checkpoint.")
    if not spec.selector:
        return default_choice(choices)
    wanted = spec.selector.lower()
    by_file = [c for c in choices if any(f.lower() == wanted or f.rsplit("/", 1)[-1].lower() == wanted for f in c.files)]
    by_quant = [c for c in choices if c.quant.lower() == wanted]
    found = by_file or by_quant
    if len(found) == 1:
        return found[0]
    available = ", ".join(f"{c.quant} ({human_bytes(c.size_bytes)})" for c in choices)
    if found:
        raise HubError(f"{spec.repo_id} has several {spec.selector} files: {', '.join(c.first_file for c in found)}.", "Name the file instead of the quant.")
    if repo.from_cache:
        raise HubError(f"HF_HUB_OFFLINE is set and the cache holds no {spec.selector!r} file of {spec.repo_id}, only {available}.",
                       "Unset HF_HUB_OFFLINE to download it, or pick a cached one.")  # fmt: skip
    raise HubError(f"{spec.repo_id} has no {spec.selector!r} file; it has {available}.", f"Pick one, e.g. `pocketlm pull {spec.repo_id}:{choices[0].quant}`.")


def check_disk_space(plan: PullPlan) -> None:
    cache = hub_cache_dir()
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    needed = plan.missing_bytes
    if needed > free:
        raise NotEnoughDisk(
            f"{plan.name} needs {gib(needed)} more disk space in {cache}, but only {gib(free)} is free.",
            "Free some space, pick a smaller quant, or point HF_HOME at a bigger disk.",
        )


def run_pull(plan: PullPlan, store: ModelStore, on_progress: ProgressCallback = ignore_progress,
             cancel: threading.Event | None = None, output: Path | None = None) -> LocalModel:  # fmt: skip
    """Fetch the plan's files (resuming, verifying) and register the model; nothing is registered on failure.

    With `output`, the model is placed there (models/pull_placement.py) and registered at that path."""
    cancel = cancel or threading.Event()
    check_disk_space(plan)
    total = plan.total_bytes
    done = 0
    description = f"Pulling {plan.name}"

    def advance(n_bytes: int) -> None:
        nonlocal done
        done += n_bytes
        on_progress(ProgressUpdate(description, done, total))

    def waiting(message: str) -> None:
        on_progress(ProgressUpdate(message, done, total))

    on_progress(ProgressUpdate(description, 0, total))
    fetched: list[RemoteFile] = []
    for file in plan.files:
        if cancel.is_set():  # also between files, and before the first: a Ctrl-C during the lookup counts
            raise Cancelled(f"Stopped pulling {plan.name}; what was downloaded is kept for next time.")
        if plan.repo.from_cache:
            advance(file.size)
        else:
            if download_file(plan.repo, file, advance, cancel, waiting).fetched:
                fetched.append(file)
    if not plan.repo.from_cache:
        remember_revision(plan.repo)
    if output is not None:
        return register_placed(plan, store, output, fetched, cancel)
    return register_pulled(plan, store, bool(fetched))


def register_pulled(plan: PullPlan, store: ModelStore, fetched: bool) -> LocalModel:
    """Register the pulled files; pocketlm owns them (may delete them on `rm`) only if it downloaded them."""
    from pocketlm.models.removal import delete_orphans

    paths = [snapshot_path(plan.repo, f) for f in plan.files]
    target = paths[0] if plan.gguf else paths[0].parent
    facts = inspect_model(target)
    if not plan.gguf:
        # The snapshot folder may hold other pulls of the same commit; the model is exactly the files pulled.
        facts = replace(facts, files=tuple(paths), size_bytes=plan.total_bytes)
    elif facts.files != tuple(paths):
        raise ModelFileError(f"{plan.name}: the pulled files do not form one GGUF model.", "Name the first part of the split file.")
    source = f"hf:{plan.repo.repo_id}@{plan.repo.commit}"
    previous = store.get(plan.name)
    replaced = [f for f in previous.files if f not in paths and store.is_owned(f)] if previous else []
    model = store.add(model_from_facts(plan.name, facts, source, repo_id=plan.repo.repo_id, revision=plan.repo.commit, owned=fetched))
    delete_orphans(store, replaced)  # the same name pulled at a newer commit: the old files are nobody's now
    return model


def register_placed(plan: PullPlan, store: ModelStore, output: Path, fetched: list[RemoteFile], cancel: threading.Event | None = None) -> LocalModel:
    """Put the pulled files at `output`, register the model there, and take what this pull downloaded out of the cache."""
    from pocketlm.models.pull_placement import place_files, placement_target
    from pocketlm.models.removal import delete_file, delete_orphans

    paths = [snapshot_path(plan.repo, f) for f in plan.files]
    single_file = plan.gguf is not None and len(paths) == 1
    folder, model_path = placement_target(output, paths, single_file)
    created = place_files(paths, folder, model_path, single_file, cancel)
    previous = store.get(plan.name)
    replaced = [f for f in previous.files if store.is_owned(f)] if previous else []
    try:
        facts = inspect_model(model_path if plan.gguf else folder)
        if not plan.gguf:
            placed = tuple(folder / p.name for p in paths)
            facts = replace(facts, files=placed, size_bytes=plan.total_bytes)
        model = store.add(model_from_facts(plan.name, facts, f"hf:{plan.repo.repo_id}@{plan.repo.commit}", repo_id=plan.repo.repo_id,
                                           revision=plan.repo.commit, owned=True, written_folder=created and not single_file))  # fmt: skip
    except BaseException:
        for path in ([model_path] if single_file else [folder / p.name for p in paths]):
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    # Downloaded by this pull only to be placed: the cache keeps no second entry, unless a registered model uses it.
    for file in fetched:
        path = snapshot_path(plan.repo, file)
        if not store.users_of(path):
            delete_file(path)
    delete_orphans(store, [f for f in replaced if f not in model.files])
    return model
