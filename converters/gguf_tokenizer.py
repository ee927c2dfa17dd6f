"""The tokenizer and chat metadata of a Hugging Face checkpoint, written as llama.cpp expects them.

SentencePiece (tokenizer.model) and byte-level BPE (tokenizer.json) are supported. llama.cpp applies its own pre-tokenizer regex, chosen by name
(`tokenizer.ggml.pre`); the name is recognised from the pre-tokenizer tokenizer.json declares, not guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.converters.base import ConversionError

# GPT-2's split pattern, which tokenizers' ByteLevel pre-tokenizer applies when `use_regex` is on.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The split patterns of the pre-tokenizers llama.cpp implements by name, as their tokenizer.json files state them.
_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _steps(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers") or [])
    return [pre_tokenizer]


def _describe(step: dict) -> str:
    kind = step.get("type")
    if kind == "ByteLevel":
        return "bytelevel-regex" if step.get("use_regex", True) else "bytelevel"
    if kind == "Split":
        pattern = (step.get("pattern") or {}).get("Regex") or (step.get("pattern") or {}).get("String")
        return f"split:{pattern}:{step.get('behavior')}"
    if kind == "Digits":
        return "digits-individual" if step.get("individual_digits") else "digits"
    return str(kind)


# Which llama.cpp pre-tokenizer a tokenizer.json pre-tokenizer amounts to.
_KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel-regex",): "gpt-2",
    ("digits-individual", "bytelevel-regex"): "smollm",
    (f"split:{_LLAMA3_PATTERN}:Isolated", "bytelevel"): "llama-bpe",
    (f"split:{_QWEN2_PATTERN}:Isolated", "bytelevel"): "qwen2",
}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    steps = tuple(_describe(step) for step in _steps(tokenizer_json.get("pre_tokenizer")))
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    prefix_space = any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in _steps(tokenizer_json.get("pre_tokenizer")))
    if normalizer not in (None, "NFC") or prefix_space:
        # llama.cpp's byte-level pre-tokenizers neither normalize (beyond NFC) nor add a leading space.
        steps += (f"normalizer {normalizer}",) if normalizer not in (None, "NFC") else ("add_prefix_space",)
    try:
        return _KNOWN_PRE_TOKENIZERS[steps]
    except KeyError:
        raise ConversionError(
            f"This tokenizer splits text in a way pocketlm cannot yet express for llama.cpp ({' + '.join(steps) or 'no pre-tokenizer'}).",
            "Its GGUF would tokenize differently from the original; look for a ready-made GGUF of this model.",
        ) from None


def write_tokenizer(writer: object, folder: Path, vocab_size: int) -> None:
    """Tokens, their types, merges, special tokens and the chat template, into the GGUF `writer`."""
    import gguf

    if (folder / "tokenizer.model").is_file():
        _write_sentencepiece(writer, folder, vocab_size)
        return
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no tokenizer.json or tokenizer.model.", "Pull or copy the tokenizer files with the weights.")
    try:
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        model = tokenizer_json["model"]
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"{path} cannot be read as a tokenizer ({error}).") from None
    if model.get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConversionError("This tokenizer.json is not byte-level BPE, and there is no tokenizer.model beside it.",
                              "Pull the repo's tokenizer.model too, or look for a ready-made GGUF of this model.")  # fmt: skip
    pre = pre_tokenizer_name(tokenizer_json)
    added = {token["id"]: token for token in tokenizer_json.get("added_tokens", [])}
    by_id = {index: text for text, index in model["vocab"].items()}
    by_id.update({index: token["content"] for index, token in added.items()})
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index]["content"])
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        elif index in by_id:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
        else:  # the embedding has rows past the tokenizer's vocabulary (padding for fast matmuls)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")  # type: ignore[attr-defined]
    writer.add_tokenizer_pre(pre)  # type: ignore[attr-defined]
    writer.add_token_list(tokens)  # type: ignore[attr-defined]
    writer.add_token_types(types)  # type: ignore[attr-defined]
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    # A Hugging Face tokenizer adds a BOS token only when its config or post-processor says so; llama.cpp's default
    # for BPE vocabularies is to add one, which would shift every prompt by a token. Say it explicitly.
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)  # type: ignore[arg-type]


def _write_sentencepiece(writer: object, folder: Path, vocab_size: int) -> None:
    """A SentencePiece tokenizer (Llama 2, TinyLlama, Mistral, Gemma, Phi-3): llama.cpp's "llama" vocabulary keeps
    the pieces, their scores and types, and whether a space is prefixed to the text as the model's own normalizer does."""
    import gguf

    try:
        vocab = gguf.SentencePieceVocab(folder)
    except (RuntimeError, OSError, ValueError) as error:
        raise ConversionError(f"Cannot read {folder / 'tokenizer.model'} as a SentencePiece model ({error}).",
                              "Install sentencepiece, or check the file.") from None  # fmt: skip
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    config_path = folder / "tokenizer_config.json"
    added = {}
    if config_path.is_file():
        try:
            added = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        except (OSError, ValueError):
            added = {}
    for key, token in added.items():
        index = int(key)
        if index >= vocab_size or not isinstance(token, dict):
            continue
        while len(tokens) <= index:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        tokens[index] = str(token.get("content", "")).encode()
        scores[index] = -1000.0
        types[index] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    while len(tokens) < vocab_size:  # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    processor = vocab.sentencepiece_tokenizer
    first = processor.encode("a")
    adds_space = bool(first) and processor.id_to_piece(first[0]).startswith("\u2581")
    writer.add_tokenizer_model("llama")  # type: ignore[attr-defined]
    writer.add_tokenizer_pre("default")  # type: ignore[attr-defined]
    writer.add_token_list(tokens[:vocab_size])  # type: ignore[attr-defined]
    writer.add_token_scores(scores[:vocab_size])  # type: ignore[attr-defined]
    writer.add_token_types(types[:vocab_size])  # type: ignore[attr-defined]
    writer.add_add_space_prefix(adds_space)  # type: ignore[attr-defined]
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)  # type: ignore[arg-type]
