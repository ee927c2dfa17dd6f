"""A tiny random llama GGUF (320-token byte-level BPE vocabulary, 2 layers, 64 dims), written with gguf's GGUFWriter.

It loads and decodes in llama.cpp in a fraction of a second, so damaged copies of it can be tried by the dozen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gguf import GGUFWriter

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 64, 4, 2, 128, 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return [characters[byte] for byte in range(256)]


def _vocabulary() -> tuple[list[str], list[int], list[str]]:
    alphabet = _byte_level_alphabet()
    merges = [f"Ġ {letter}" for letter in "tashwiobmfcdpl"]
    merges += [f"{first} {second}" for first in "thisnaeo" for second in "ehnrtsd" if first != second][:47]
    merged = [merge.replace(" ", "") for merge in merges]
    tokens = SPECIAL_TOKENS + alphabet + merged
    assert len(set(tokens)) == len(tokens)
    token_types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, token_types, merges


def tiny_llama_gguf_path() -> Path:
    """The tiny model, written once into the test cache (the random weights are seeded, so every copy is the same)."""
    from tests.fixtures import CACHE_DIR

    destination = CACHE_DIR / "models" / "tiny-random-llama-v1.gguf"
    if not destination.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_llama_gguf(destination)
    return destination


def write_tiny_llama_gguf(destination: Path, customize: Callable[[GGUFWriter], None] | None = None) -> Path:
    """Write the tiny model to `destination` and return its path.

    `customize` gets the writer after the metadata is added and before anything is written: it may overwrite a key
    (`add_key_value` replaces one of the same name), delete one from `writer.kv_data[0]`, or add tensors.
    """
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    tokens, token_types, merges = _vocabulary()
    partial = destination.with_name(destination.name + ".partial")
    writer = GGUFWriter(partial, "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    rng = np.random.default_rng(14)

    def weight(*shape: int) -> np.ndarray:  # numpy order: (rows, columns) = GGUF's (ne1, ne0)
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    head_dim = N_EMBD // N_HEAD
    writer.add_tensor("token_embd.weight", weight(len(tokens), N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for layer in range(N_LAYER):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{block}.attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{block}.attn_k.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{block}.attn_v.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{block}.attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(f"{block}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(N_EMBD, N_FF))
    if customize:
        customize(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(destination)
    return destination
