"""The repos the loopback Hub serves: one of each case pull must handle.

GGUF_REPO holds the real starter model (Q4_1) beside small GGUF files with real headers (Q4_K_M, Q8_0, a Q2_K split
in two parts): pull tests check which files move and what is registered, and only the Q4_1 file is ever chatted with.
TINY_CHECKPOINT is a real (random-weight) two-layer Llama checkpoint in safetensors, with files pull must skip.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from tests.hub.server import HubFile, HubRepo

GGUF_REPO = "pocketlm-test/SmolLM2-135M-Instruct-GGUF"
STARTER_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"
TINY_CHECKPOINT = "pocketlm-test/tiny-llama"
GATED_REPO = "pocketlm-test/gated-llama-GGUF"
PICKLE_REPO = "pocketlm-test/pickle-only"
BAD_CHECKSUM_REPO = "pocketlm-test/bad-checksum-GGUF"
HUGE_REPO = "pocketlm-test/huge-405B-GGUF"

TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def small_gguf(file_type: int, split: tuple[int, int] | None = None) -> bytes:
    """A small Llama-architecture GGUF whose header states `file_type`; `split` = (part, count) for a split model."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        if split is None or split[0] == 1:
            writer.add_name("SmolLM2 test")
            writer.add_context_length(2048)
            writer.add_block_count(1)
            writer.add_embedding_length(8)
            writer.add_head_count(1)
            writer.add_file_type(file_type)
        if split is not None:
            writer.add_uint16("split.no", split[0] - 1)
            writer.add_uint16("split.count", split[1])
            writer.add_int32("split.tensors.count", split[1])
        writer.add_tensor(f"blk.{split[0] if split else 0}.attn_norm.weight", np.ones(8 * 16, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def tiny_llama_weights(seed: int = 0) -> bytes:
    from safetensors.numpy import save

    c = TINY_LLAMA_CONFIG
    hidden, inner, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for layer in range(c["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (hidden, hidden), prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden), prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inner, hidden), prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner), prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    tensors = {name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in shapes.items()}
    return save(tensors, metadata={"format": "pt"})


def tiny_llama_parameter_count() -> int:
    c = TINY_LLAMA_CONFIG
    hidden, inner = c["hidden_size"], c["intermediate_size"]
    kv = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * inner * hidden + 2 * hidden
    return c["vocab_size"] * hidden + hidden + c["num_hidden_layers"] * per_layer


def _text(value: object) -> HubFile:
    raw = value.encode() if isinstance(value, str) else json.dumps(value, indent=2).encode()
    return HubFile(raw, lfs=False)


def fixture_repos(starter: bytes) -> list[HubRepo]:
    from gguf import LlamaFileType

    readme = _text("---\nlicense: apache-2.0\n---\n# test model\n")
    gguf_repo = HubRepo(
        GGUF_REPO,
        {
            STARTER_FILE: HubFile(starter),
            "SmolLM2-135M-Instruct-Q4_K_M.gguf": HubFile(small_gguf(LlamaFileType.MOSTLY_Q4_K_M)),
            "SmolLM2-135M-Instruct-Q8_0.gguf": HubFile(small_gguf(LlamaFileType.MOSTLY_Q8_0)),
            "Q2_K/SmolLM2-135M-Instruct-Q2_K-00001-of-00002.gguf": HubFile(small_gguf(LlamaFileType.MOSTLY_Q2_K, (1, 2))),
            "Q2_K/SmolLM2-135M-Instruct-Q2_K-00002-of-00002.gguf": HubFile(small_gguf(LlamaFileType.MOSTLY_Q2_K, (2, 2))),
            "README.md": readme,
            ".gitattributes": _text("*.gguf filter=lfs diff=lfs merge=lfs -text\n"),
        },
        tags=["gguf", "llama", "conversational"], downloads=5000, likes=40,
    )  # fmt: skip
    checkpoint = HubRepo(
        TINY_CHECKPOINT,
        {
            "config.json": _text(TINY_LLAMA_CONFIG),
            "generation_config.json": _text({"bos_token_id": 1, "eos_token_id": 2}),
            "tokenizer_config.json": _text({"model_max_length": 512, "chat_template": "{{ messages }}"}),
            "model.safetensors": HubFile(tiny_llama_weights()),
            "pytorch_model.bin": HubFile(b"PK\x03\x04 pickle weights pull must not fetch"),
            "original/consolidated.00.pth": HubFile(b"PK\x03\x04 more pickle"),
            "onnx/model.onnx": HubFile(b"onnx"),
            "README.md": readme,
        },
        tags=["transformers", "safetensors", "llama", "text-generation"], library_name="transformers", downloads=900, likes=3,
        last_modified="2026-11-01T08:00:00.000Z",
    )  # fmt: skip
    gated = HubRepo(GATED_REPO, {"gated-Q4_K_M.gguf": HubFile(small_gguf(LlamaFileType.MOSTLY_Q4_K_M))},
                    tags=["gguf", "llama"], gated=True, downloads=300)  # fmt: skip
    pickle_only = HubRepo(PICKLE_REPO, {"config.json": _text(TINY_LLAMA_CONFIG), "pytorch_model.bin": HubFile(b"PK\x03\x04 pickle")},
                          tags=["transformers", "pytorch", "llama"], downloads=20)  # fmt: skip
    bad = HubRepo(BAD_CHECKSUM_REPO, {"bad-Q4_K_M.gguf": HubFile(small_gguf(LlamaFileType.MOSTLY_Q4_K_M), claimed_sha256="0" * 64)},
                  tags=["gguf"], downloads=10)  # fmt: skip
    huge = HubRepo(HUGE_REPO, {"huge-405B-Q4_K_M.gguf": HubFile(small_gguf(LlamaFileType.MOSTLY_Q4_K_M), claimed_size=50 * 2**40)},
                   tags=["gguf", "llama"], downloads=7000, likes=900)  # fmt: skip
    return [gguf_repo, checkpoint, gated, pickle_only, bad, huge]


HOSTILE_OWNER = "pocketlm-hostile"


def hostile_repo(case: str, files: dict[str, HubFile], commit: str | None = None) -> HubRepo:
    """A repo as a hostile (or broken) Hub would describe it; tests add it to the running server's repos."""
    return HubRepo(f"{HOSTILE_OWNER}/{case}", files, tags=["gguf"], claimed_commit=commit)


def small_q4_k_m(**claims: object) -> HubFile:
    """A small, valid Q4_K_M GGUF file; `claims` state what the metadata says about it (checksums, missing)."""
    from gguf import LlamaFileType

    return HubFile(small_gguf(LlamaFileType.MOSTLY_Q4_K_M), **claims)  # type: ignore[arg-type]
