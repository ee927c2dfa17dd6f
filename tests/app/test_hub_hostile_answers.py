"""A Hub that answers with hostile file names, checksums or commit ids: `pocketlm pull` (a real subprocess against the
loopback Hub) refuses the repo with one sentence and writes nothing outside the repo's cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pocketlm.models.hub import repo_cache_dir
from tests.app.test_cli import assert_clean_failure, pocketlm
from tests.hub.repos import hostile_repo, small_q4_k_m
from tests.hub.server import HubRepo, LoopbackHub


def everything_under(folder: Path) -> set[Path]:
    """Every file, link and folder below `folder` (links not followed)."""
    found = set()
    for root, folders, files in os.walk(folder):
        found.update(Path(root) / name for name in folders + files)
    return found


def pull_refused(hub: LoopbackHub, repo: HubRepo, home: Path, tmp_path: Path, message: str) -> None:
    """Pulling `repo` fails with `message`, and nothing appears outside its cache folder (nor inside it)."""
    hub.repos[repo.repo_id] = repo
    before = everything_under(tmp_path)
    assert_clean_failure(pocketlm("pull", repo.repo_id, home=home), message)
    written = everything_under(tmp_path) - before
    cache = repo_cache_dir(repo.repo_id)
    assert [p for p in written if not p.is_relative_to(cache)] == []
    assert [p for p in written if p.is_file()] == []  # refused before any transfer
    assert hub.transfers == []


# Each name would put the file elsewhere than the snapshot folder if it were joined to it as it comes.
HOSTILE_NAMES = [
    "../../../../../evil-q4_k_m.gguf",  # five folders up: beside the Hub cache
    "sub/../../../../../evil2-q8_0.gguf",  # into the cache's parent folder
    "/tmp/pocketlm-evil-abs-q4_k_m.gguf",  # absolute
    "..\\..\\..\\evil-win-q4_k_m.gguf",  # a path on Windows
    "C:evil-drive-q4_k_m.gguf",  # a drive on Windows
    "evil\x00-nul-q4_k_m.gguf",  # NUL ends the name in C
    "evil\x1b[2J-ansi-q4_k_m.gguf",  # a terminal escape
    "evil\n-newline-q4_k_m.gguf",
    "sub//empty-component-q4_k_m.gguf",
    "./dot-q4_k_m.gguf",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[f"name{i}" for i in range(len(HOSTILE_NAMES))])
def test_a_hostile_file_name_is_refused_with_a_sentence_and_nothing_written(
    loopback_hub: LoopbackHub, pocket_home: Path, tmp_path: Path, name: str
) -> None:
    repo = hostile_repo("names", {name: small_q4_k_m()})
    pull_refused(loopback_hub, repo, pocket_home, tmp_path, f"lists a file named {name!r}, which is not a safe path inside its folder")
    snapshot = repo_cache_dir(repo.repo_id) / "snapshots" / repo.commit
    assert not Path(os.path.normpath(snapshot / name.replace("\x00", ""))).exists()  # where it would have landed


@pytest.mark.parametrize(
    "claims",
    [
        {"claimed_sha256": "../../../../evil-blob"},
        {"claimed_sha256": "a/b"},
        {"claimed_sha256": ".."},
        {"claimed_sha256": "f" * 300},  # too long for a file name on most file systems
        {"claimed_sha256": "abc\x00def"},
        {"lfs": False, "claimed_git_oid": "../../evil-oid"},
    ],
    ids=["climbs", "slash", "dotdot", "too-long", "nul", "git-oid"],
)
def test_a_hostile_checksum_is_refused_with_a_sentence_and_nothing_written(
    loopback_hub: LoopbackHub, pocket_home: Path, tmp_path: Path, claims: dict[str, object]
) -> None:
    repo = hostile_repo("etags", {"model-Q4_K_M.gguf": small_q4_k_m(**claims)})
    pull_refused(loopback_hub, repo, pocket_home, tmp_path, "which is not a plain id of letters and digits; the repo is refused")


def test_a_hostile_commit_id_is_refused_with_a_sentence(loopback_hub: LoopbackHub, pocket_home: Path, tmp_path: Path) -> None:
    repo = hostile_repo("commit", {"model-Q4_K_M.gguf": small_q4_k_m()}, commit="../../../evil-commit")
    pull_refused(loopback_hub, repo, pocket_home, tmp_path, "gives its commit id as '../../../evil-commit'")


def test_a_quoted_weak_etag_is_read_as_its_token(loopback_hub: LoopbackHub, pocket_home: Path) -> None:
    file = small_q4_k_m()
    file.claimed_sha256 = f'W/"{file.sha256}"'  # how an HTTP ETag header may carry it
    repo = hostile_repo("weak-etag", {"model-Q4_K_M.gguf": file})
    loopback_hub.repos[repo.repo_id] = repo
    pulled = pocketlm("pull", repo.repo_id, home=pocket_home)
    assert pulled.returncode == 0, pulled.stderr
    blobs = [p.name for p in (repo_cache_dir(repo.repo_id) / "blobs").iterdir()]
    assert blobs == [file.sha256.removeprefix('W/"').rstrip('"')]


def test_a_listed_file_the_hub_does_not_have_is_named_as_missing(loopback_hub: LoopbackHub, pocket_home: Path) -> None:
    repo = hostile_repo("missing", {"gone-Q4_K_M.gguf": small_q4_k_m(missing=True)})
    loopback_hub.repos[repo.repo_id] = repo
    result = pocketlm("pull", repo.repo_id, home=pocket_home)
    assert_clean_failure(result, f"{repo.repo_id} lists 'gone-Q4_K_M.gguf', but the Hub has no such file at revision main.")
    assert "Try again in a moment" not in result.stderr


@pytest.mark.parametrize("size", [-1, 2**60], ids=["negative", "beyond-any-disk"])
def test_an_impossible_size_is_refused_with_a_sentence(loopback_hub: LoopbackHub, pocket_home: Path, tmp_path: Path, size: int) -> None:
    repo = hostile_repo(f"size{size}", {"model-Q4_K_M.gguf": small_q4_k_m(claimed_size=size)})
    pull_refused(loopback_hub, repo, pocket_home, tmp_path, f"gives the size of 'model-Q4_K_M.gguf' as {size}, which is not a number of bytes")


# JSON, but not of the Hub's shapes: a list for an object, numbers for names and counts, null.
MISSHAPEN_ANSWERS = [b"[1, 2, 3]", b"{}", b'[{"id": 5}]', b'[{"id": "a/b", "siblings": 7}]', b'"text"', b"null",
                     b'[{"id": "x/y", "downloads": "many", "likes": [], "tags": 3}]', b'[{"id": "x/[red]y"}]']  # fmt: skip


@pytest.mark.parametrize("answer", MISSHAPEN_ANSWERS, ids=[f"answer{i}" for i in range(len(MISSHAPEN_ANSWERS))])
def test_a_misshapen_answer_is_blamed_on_the_server_not_on_pocketlm(loopback_hub: LoopbackHub, pocket_home: Path, answer: bytes) -> None:
    loopback_hub.raw_answers = {"/api/models": answer, "/api/models/owner/name": answer}
    searched = pocketlm("search", "x", home=pocket_home)
    assert searched.returncode in (0, 1) and "Traceback" not in searched.stderr and "unexpectedly" not in searched.stderr, searched.stderr
    assert "[red]" not in searched.stdout, "a search hit without a plain repo name is left out"
    assert_clean_failure(pocketlm("pull", "owner/name", home=pocket_home), "did not answer like the Hugging Face Hub")
