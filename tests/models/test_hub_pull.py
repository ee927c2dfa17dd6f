"""Search and pull through the real huggingface_hub client, against the loopback Hub (tests/hub/server.py)."""

from __future__ import annotations

import threading

import pytest

from pocketlm.models.errors import Cancelled, HubError, ModelFileError, NotEnoughDisk
from pocketlm.models.hub import hub_cache_dir, repo_cache_dir, search_models
from pocketlm.models.progress import ProgressUpdate
from pocketlm.models.pull import parse_pull_spec, plan_pull, run_pull
from pocketlm.models.store import ModelStore
from tests.hub.repos import (BAD_CHECKSUM_REPO, GATED_REPO, GGUF_REPO, HUGE_REPO, PICKLE_REPO, STARTER_FILE, TINY_CHECKPOINT,
                             tiny_llama_parameter_count)  # fmt: skip
from tests.hub.server import LoopbackHub, Transfer


def pull(spec: str, store: ModelStore, **kwargs: object):  # type: ignore[no-untyped-def]
    return run_pull(plan_pull(parse_pull_spec(spec)), store, **kwargs)  # type: ignore[arg-type]


def test_search_shows_formats_and_the_quant_files_of_gguf_repos(loopback_hub: LoopbackHub) -> None:
    results = search_models("smollm2")
    assert [r.repo_id for r in results] == [GGUF_REPO]
    assert results[0].formats == ("gguf",)
    assert results[0].downloads == 5000 and results[0].likes == 40
    quants = {c.quant: c for c in results[0].gguf_files}
    assert set(quants) == {"Q4_K_M", "Q8_0", "Q2_K", "Q4_1"}
    assert quants["Q4_1"].size_bytes == 98_362_432
    assert len(quants["Q2_K"].files) == 2

    checkpoints = search_models("", format="safetensors")
    assert [r.repo_id for r in checkpoints] == [TINY_CHECKPOINT]
    by_likes = search_models("", format="gguf", sort="likes")
    assert [r.repo_id for r in by_likes][:2] == [HUGE_REPO, GGUF_REPO]


def test_pull_by_quant_name_fetches_only_that_file_into_the_shared_cache(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    from huggingface_hub import try_to_load_from_cache

    model = pull(f"{GGUF_REPO}:q4_1", model_store)
    assert model.name == f"{GGUF_REPO}:Q4_1"
    assert [t.path for t in loopback_hub.transfers] == [f"{GGUF_REPO}/{STARTER_FILE}"]
    assert (model.format, model.architecture, model.quantization) == ("gguf", "llama", "Q4_1")
    assert model.parameter_count > 130_000_000 and model.size_bytes == 98_362_432
    repo = loopback_hub.repos[GGUF_REPO]
    assert (model.repo_id, model.revision, model.owned) == (GGUF_REPO, repo.commit, True)
    # An ordinary Hub cache entry: huggingface_hub itself finds the file, a link to a blob named by its sha256.
    assert try_to_load_from_cache(GGUF_REPO, STARTER_FILE, cache_dir=hub_cache_dir()) == str(model.path)
    assert model.path.is_symlink() and model.path.resolve().name == repo.files[STARTER_FILE].sha256
    assert model_store.get(model.name) == model


def test_default_quant_is_q4_k_m_and_the_others_are_listed(loopback_hub: LoopbackHub) -> None:
    plan = plan_pull(parse_pull_spec(GGUF_REPO))
    assert plan.gguf is not None and plan.gguf.quant == "Q4_K_M"
    assert {c.quant for c in plan.other_quants} == {"Q8_0", "Q2_K", "Q4_1"}


def test_a_split_gguf_comes_with_every_part(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    model = pull(f"hf.co/{GGUF_REPO}:Q2_K", model_store)
    assert [p.name for p in model.files] == ["SmolLM2-135M-Instruct-Q2_K-00001-of-00002.gguf", "SmolLM2-135M-Instruct-Q2_K-00002-of-00002.gguf"]
    assert model.path == model.files[0]
    assert model.size_bytes == sum(p.stat().st_size for p in model.files)
    assert len(loopback_hub.transfers) == 2


def test_a_checkpoint_pull_takes_config_tokenizer_and_safetensors_only(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    model = pull(TINY_CHECKPOINT, model_store)
    fetched = sorted(t.path.split("/", 2)[2] for t in loopback_hub.transfers)
    assert fetched == ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    assert (model.format, model.architecture, model.quantization, model.context_length) == ("safetensors", "llama", "F32", 512)
    assert model.parameter_count == tiny_llama_parameter_count()
    assert model.path.is_dir() and len(model.files) == 4


def test_a_transfer_cut_midway_resumes_without_fetching_bytes_again(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    cut_at = 10 * 2**20
    loopback_hub.cut_next_transfer(STARTER_FILE, cut_at)
    model = pull(f"{GGUF_REPO}:Q4_1", model_store)
    size = model.size_bytes
    assert loopback_hub.transfers_of(STARTER_FILE) == [
        Transfer(f"{GGUF_REPO}/{STARTER_FILE}", 0, cut_at),
        Transfer(f"{GGUF_REPO}/{STARTER_FILE}", cut_at, size - cut_at),
    ]


def test_a_cancelled_pull_resumes_next_time_from_where_it_stopped(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    cancel = threading.Event()
    updates: list[ProgressUpdate] = []

    def stop_after_some_bytes(update: ProgressUpdate) -> None:
        updates.append(update)
        if update.completed >= 20 * 2**20:
            cancel.set()

    with pytest.raises(Cancelled, match="kept for next time"):
        pull(f"{GGUF_REPO}:Q4_1", model_store, on_progress=stop_after_some_bytes, cancel=cancel)
    assert model_store.list() == []
    first = loopback_hub.transfers_of(STARTER_FILE)[0].bytes_sent
    partial = next(repo_cache_dir(GGUF_REPO).glob("blobs/*.pocketlm-partial"))
    kept = partial.stat().st_size
    assert 20 * 2**20 <= kept <= first
    assert all(u.total == 98_362_432 for u in updates)

    model = pull(f"{GGUF_REPO}:Q4_1", model_store)
    second = loopback_hub.transfers_of(STARTER_FILE)[1]
    assert (second.range_start, second.bytes_sent) == (kept, model.size_bytes - kept)
    assert not partial.exists()


def test_a_checksum_mismatch_is_rejected_and_leaves_nothing(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    with pytest.raises(ModelFileError, match="failed verification.*discarded"):
        pull(BAD_CHECKSUM_REPO, model_store)
    assert model_store.list() == []
    assert [p for p in repo_cache_dir(BAD_CHECKSUM_REPO).rglob("*") if p.is_file() or p.is_symlink()] == []


def test_gated_repo_needs_a_token(loopback_hub: LoopbackHub, model_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError, match="is gated") as refused:
        pull(GATED_REPO, model_store)
    assert "HF_TOKEN" in refused.value.hint
    monkeypatch.setenv("HF_TOKEN", loopback_hub.accepted_token)
    assert pull(GATED_REPO, model_store).quantization == "Q4_K_M"
    assert [t.sent_token for t in loopback_hub.transfers] == [False]  # the token went to the Hub, never to its CDN


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pocketlm-test/no-such-model", "No model 'pocketlm-test/no-such-model' on the Hub, or it is private"),
        (f"{GGUF_REPO}@v9", "has no branch, tag or commit 'v9'"),
        (f"{GGUF_REPO}:Q9_K", "has no 'Q9_K' file; it has Q4_K_M (864 B), Q8_0 (864 B), Q2_K"),
        (f"{GGUF_REPO}:nope.gguf", "has no 'nope.gguf' file"),
        ("not a repo", "is not a Hub model name"),
        (PICKLE_REPO, "has only pickle weights (pytorch_model.bin)"),
    ],
)
def test_what_cannot_be_pulled_gets_one_sentence(loopback_hub: LoopbackHub, spec: str, message: str) -> None:
    with pytest.raises(HubError) as refused:
        plan_pull(parse_pull_spec(spec))
    assert message in refused.value.message
    assert loopback_hub.transfers == []


def test_pickle_weights_only_when_allowed(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    model = run_pull(plan_pull(parse_pull_spec(PICKLE_REPO), allow_pickle=True), model_store)
    assert model.format == "pytorch"
    assert sorted(p.name for p in model.files) == ["config.json", "pytorch_model.bin"]


def test_no_network_is_one_sentence(loopback_hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, the connection is refused
    with pytest.raises(HubError, match="Cannot reach the Hugging Face Hub"):
        plan_pull(parse_pull_spec(GGUF_REPO))
    with pytest.raises(HubError, match="Cannot reach the Hugging Face Hub"):
        search_models("smollm2")


def test_not_enough_disk_is_refused_before_any_transfer(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    with pytest.raises(NotEnoughDisk, match=r"needs 51200\.0 GiB more disk space in .* but only .* GiB is free"):
        pull(HUGE_REPO, model_store)
    assert loopback_hub.transfers == []
    assert model_store.list() == []


def test_offline_pulls_from_the_cache(loopback_hub: LoopbackHub, model_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    online = pull(f"{GGUF_REPO}:Q4_K_M", model_store)
    model_store.remove(online.name)
    loopback_hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = plan_pull(parse_pull_spec(GGUF_REPO))
    assert plan.repo.from_cache
    assert run_pull(plan, model_store).path == online.path
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and the cache holds no 'Q8_0' file"):
        plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q8_0"))
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and pocketlm-test/tiny-llama@main is not in the local cache"):
        plan_pull(parse_pull_spec(TINY_CHECKPOINT))


def test_pulling_again_fetches_nothing(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    first = pull(TINY_CHECKPOINT, model_store)
    count = len(loopback_hub.transfers)
    assert pull(TINY_CHECKPOINT, model_store).files == first.files
    assert len(loopback_hub.transfers) == count


def test_pulled_model_chats(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    from pocketlm.app.model_loading import choose_model, load_model
    from pocketlm.backends.base import LoadOptions
    from tests.fixtures import capital_question, greedy_reply

    pull(f"{GGUF_REPO}:Q4_1", model_store)
    model = load_model(choose_model(model_store, "smollm2-135m-instruct-gguf:q4_1"), LoadOptions(context_length=512))
    try:
        text = greedy_reply(model, capital_question())
    finally:
        model.close()
    assert "Paris" in text


def test_search_sorts_by_last_update(loopback_hub: LoopbackHub) -> None:
    assert search_models("", sort="updated")[0].repo_id == TINY_CHECKPOINT  # the most recently updated


def test_a_server_that_ignores_the_range_gets_the_file_again_whole(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    loopback_hub.cut_next_transfer(STARTER_FILE, 5 * 2**20)
    loopback_hub.ignore_range.add(STARTER_FILE)
    updates: list[ProgressUpdate] = []
    model = pull(f"{GGUF_REPO}:Q4_1", model_store, on_progress=updates.append)
    assert [(t.range_start, t.bytes_sent) for t in loopback_hub.transfers_of(STARTER_FILE)] == [(0, 5 * 2**20), (0, model.size_bytes)]
    assert max(u.completed for u in updates) == updates[-1].completed == model.size_bytes  # progress never passes 100%


def test_a_damaged_partial_file_is_caught_by_the_checksum(loopback_hub: LoopbackHub, model_store: ModelStore) -> None:
    plan = plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q4_1"))
    partial = repo_cache_dir(GGUF_REPO) / "blobs" / (plan.files[0].etag + ".pocketlm-partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 4096)  # not the file's first bytes: a disk error, another program's write
    with pytest.raises(ModelFileError, match="failed verification"):
        run_pull(plan, model_store)
    assert not partial.exists() and model_store.list() == []
    assert pull(f"{GGUF_REPO}:Q4_1", model_store).size_bytes == 98_362_432  # the next pull starts clean


def test_a_server_that_sends_nothing_is_given_up_on(loopback_hub: LoopbackHub, model_store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from pocketlm.models import hub_download

    monkeypatch.setattr(hub_download, "_ATTEMPTS_WITHOUT_PROGRESS", 2)  # the default (5, with back-off) takes 15 s
    loopback_hub.empty_bodies.add("SmolLM2-135M-Instruct-Q8_0.gguf")
    with pytest.raises(HubError, match=r"made no progress after 3 tries \(the server ended the transfer early\)"):
        pull(f"{GGUF_REPO}:Q8_0", model_store)
    assert len(loopback_hub.transfers_of("SmolLM2-135M-Instruct-Q8_0.gguf")) == 3
    assert model_store.list() == []
