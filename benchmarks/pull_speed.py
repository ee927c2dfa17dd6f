"""Pull throughput: pocketlm's resumable, verifying transfer vs huggingface_hub's own `hf_hub_download`.

Both fetch the starter GGUF (98 MB) from the loopback Hub-compatible server of the tests, into fresh caches,
alternating, several times; the table prints MB/s and the ratio. pocketlm also hashes every byte (sha256) as it
arrives, which `hf_hub_download` does not do.

    python benchmarks/pull_speed.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures import starter_gguf_path  # noqa: E402
from tests.hub.repos import GGUF_REPO, STARTER_FILE, fixture_repos  # noqa: E402
from tests.hub.server import LoopbackHub  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    hub = LoopbackHub(fixture_repos(starter_gguf_path().read_bytes())).start()
    os.environ["HF_ENDPOINT"] = hub.url
    from huggingface_hub import hf_hub_download

    from pocketlm.models.hub import list_repo
    from pocketlm.models.hub_download import download_file

    size = (starter_gguf_path()).stat().st_size
    timings: dict[str, list[float]] = {"pocketlm download_file": [], "huggingface_hub hf_hub_download": []}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["HF_HUB_CACHE"] = cache
            repo = list_repo(GGUF_REPO)
            start = time.perf_counter()
            download_file(repo, repo.file(STARTER_FILE), lambda n: None, threading.Event())  # type: ignore[arg-type]
            timings["pocketlm download_file"].append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            hf_hub_download(GGUF_REPO, STARTER_FILE, cache_dir=cache, endpoint=hub.url)
            timings["huggingface_hub hf_hub_download"].append(time.perf_counter() - start)
    hub.stop()

    reference = statistics.median(timings["huggingface_hub hf_hub_download"])
    print(f"{'transfer':<34} {'median s':>9} {'MB/s':>8} {'speed ratio':>12}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<34} {median:>9.3f} {size / median / 1e6:>8.0f} {reference / median:>12.2f}")


if __name__ == "__main__":
    main()
