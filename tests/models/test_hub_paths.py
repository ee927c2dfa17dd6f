"""Behind the checks on what the Hub says, every cache path is checked to lie inside the repo's folder before
anything is written there."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pocketlm.models.errors import HubError
from pocketlm.models.hub import repo_cache_dir
from pocketlm.models.hub_download import blob_path, snapshot_path
from pocketlm.models.pull import parse_pull_spec, plan_pull
from tests.hub.repos import GGUF_REPO
from tests.hub.server import LoopbackHub


def test_a_cache_path_outside_the_repo_folder_is_refused(loopback_hub: LoopbackHub) -> None:
    plan = plan_pull(parse_pull_spec(f"{GGUF_REPO}:Q8_0"))
    climbing = replace(plan.files[0], name="../../../../escape.gguf")
    with pytest.raises(HubError, match="outside the repo's cache folder"):
        snapshot_path(plan.repo, climbing)
    with pytest.raises(HubError, match="outside the repo's cache folder"):
        blob_path(plan.repo, replace(plan.files[0], sha256="../../../x"))
    inside = replace(plan.files[0], name="sub/../model.gguf")  # climbs, but stays in the snapshot folder
    assert snapshot_path(plan.repo, inside).is_relative_to(repo_cache_dir(GGUF_REPO))
    assert not repo_cache_dir(GGUF_REPO).exists()
