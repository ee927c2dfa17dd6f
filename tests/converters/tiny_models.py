"""Tiny random models, one per architecture the GGUF converter supports, built from transformers configs in seconds.

Weights are drawn wider than transformers' initialisation (which leaves logits almost uniform) and norm weights
away from 1, so a misplaced, mis-permuted or mis-scaled tensor changes the logits visibly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 49152, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip

TINY_CONFIGS: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("LlamaConfig", {**SMALL, "tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", {**SMALL, "tie_word_embeddings": True}),
    "llama3-rope-scaling": ("LlamaConfig", {**SMALL, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-attention-bias": ("LlamaConfig", {**SMALL, "attention_bias": True}),
    "mistral": ("MistralConfig", {**SMALL, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**SMALL, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**SMALL, "head_dim": 32, "tie_word_embeddings": True}),
    # llama.cpp scales Gemma 2's attention by 1/sqrt(head_dim), so query_pre_attn_scalar is head_dim here, as in the
    # 2B and 9B models; the windows and soft-capping are the real models' settings.
    "gemma2": ("Gemma2Config", {**SMALL, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4096,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3": ("Gemma3TextConfig", {**SMALL, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4096,
                                    "layer_types": ["sliding_attention", "full_attention"], "hidden_activation": "gelu_pytorch_tanh",
                                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}),
    "phi3": ("Phi3Config", {**SMALL, "tie_word_embeddings": False, "pad_token_id": 0, "sliding_window": None}),
}  # fmt: skip


def build_tiny_model(kind: str, destination: Path, tokenizer_folder: Path, dtype: str = "float32", vocab_size: int | None = None) -> Path:
    """Save a random `kind` model (safetensors in `dtype`) with the given tokenizer into `destination`."""
    import torch
    import transformers

    class_name, settings = TINY_CONFIGS[kind]
    config = getattr(transformers, class_name)(**{**settings, **({"vocab_size": vocab_size} if vocab_size else {})})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.15)
    model.to(getattr(torch, dtype)).save_pretrained(destination)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, destination / name)
    return destination


SENTENCEPIECE_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Café, naïve, résumé, Zürich and Ærøskøbing; 日本語のテキストと中文字符，还有한국어 문장도 있습니다。
def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)
Numbers like 3.14159, 1,234,567 and 2026-11-23 appear in text; so do emoji 🤖🚀 and tabs\tand   spaces.
"""


def train_sentencepiece_tokenizer(destination: Path) -> Path:
    """A small Llama-2-style SentencePiece BPE tokenizer (byte fallback, digits split, whitespace kept as written),
    trained with the real sentencepiece trainer, with the tokenizer_config.json transformers reads beside it."""
    import json

    import sentencepiece

    destination.mkdir(parents=True, exist_ok=True)
    corpus = destination / "corpus.txt"
    corpus.write_text(SENTENCEPIECE_TRAINING_TEXT * 20, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(destination / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=-1, unk_id=0, bos_id=1, eos_id=2, split_digits=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        minloglevel=2, num_threads=1,
    )  # fmt: skip
    corpus.unlink()
    (destination / "tokenizer.vocab").unlink(missing_ok=True)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    (destination / "tokenizer_config.json").write_text(json.dumps(config))
    return destination


def edit_config(folder: Path, **changes: object) -> None:
    """Change config.json's keys in `folder` (a value of None removes the key)."""
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def rewrite_safetensors_header(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """Let `edit` change `path`'s header (a dict, in place) and write it back in front of the same data bytes."""
    import json
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header with spaces to keep the data aligned
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
