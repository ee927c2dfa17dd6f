"""The converted GGUF computes what the checkpoint computes: logits through llama.cpp vs transformers, per architecture,
and the tokenizer id for id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pocketlm.converters.base import ConvertOptions
from pocketlm.converters.gguf_settings import GGUFSettings
from pocketlm.converters.hf_to_gguf import HfToGGUF
from pocketlm.models.progress import ignore_progress
from tests.converters.tiny_models import TINY_CONFIGS, build_tiny_model

# Token ids of an ordinary English sentence in SmolLM2's vocabulary (BOS first), long enough to exercise RoPE.
TOKEN_IDS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 216, 5248, 260, 1789, 282, 5103, 28, 3012, 21, 1243, 48, 18, 9]


def llama_cpp_logits(gguf: Path, token_ids: list[int]) -> np.ndarray:
    import llama_cpp

    # An f32 KV cache: llama.cpp's default f16 cache would round K and V and hide what this test looks for.
    model = llama_cpp.Llama(str(gguf), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
    try:
        model.eval(token_ids)
        return np.array(model.scores[: len(token_ids)])
    finally:
        model.close()


def transformers_logits(folder: Path, token_ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


# ggml's CPU GELU reads a float16 lookup table (GGML_GELU_FP16) instead of computing tanh: about 1e-3 relative
# error per activation, which Gemma's GELU MLPs carry into the logits (measured 5.4e-4 here). The SiLU models keep
# the strict bound.
F32_BOUND = {"gemma2": 2e-3, "gemma3": 2e-3}


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_logits_match_transformers(kind: str, starter_checkpoint: Path, tmp_path: Path) -> None:
    # Not named after the architecture: llama.cpp gives a model whose general.name says "phi3" Phi-3's own special
    # tokens, which SmolLM2's vocabulary (used by every tiny model here) does not have.
    checkpoint = build_tiny_model(kind, tmp_path / "checkpoint", starter_checkpoint)
    expected = transformers_logits(checkpoint, TOKEN_IDS)
    scale = np.abs(expected).max()

    f32 = HfToGGUF().convert(checkpoint, tmp_path / "f32.gguf", ConvertOptions(settings=GGUFSettings(outtype="f32")), ignore_progress).path
    # f32 end to end: only the order of float additions differs between the two engines (measured: about 1e-6 of
    # the largest logit); 1e-4 leaves room for other CPUs' SIMD paths while any misplaced weight moves logits by
    # far more (a wrong q/k permutation, a missed norm or bias: 1e-1 and up).
    f32_error = np.abs(llama_cpp_logits(f32, TOKEN_IDS) - expected).max() / scale
    assert f32_error < F32_BOUND.get(kind, 1e-4), f"{kind} f32: largest logit error {f32_error:.2e} of the largest logit"

    f16 = HfToGGUF().convert(checkpoint, tmp_path / "f16.gguf", ConvertOptions(settings=GGUFSettings(outtype="f16")), ignore_progress).path
    # f16 weights carry an 11-bit mantissa (relative rounding up to 4.9e-4 per weight); through two layers it came to
    # about 1.6e-3 of the largest logit. 1e-2 is a bound f16 rounding stays under and a conversion error does not.
    got = llama_cpp_logits(f16, TOKEN_IDS)
    f16_error = np.abs(got - expected).max() / scale
    assert f16_error < 1e-2, f"{kind} f16: largest logit error {f16_error:.2e} of the largest logit"
    # The top token agrees wherever the reference's lead over its runner-up is wider than the error just bounded; a
    # near-tie in a random model's logits is for the CPU's rounding to decide, on any engine.
    ranked = np.sort(expected, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 2 * f16_error * scale
    assert clear.any() and (got.argmax(axis=1) == expected.argmax(axis=1))[clear].all()


def test_a_bf16_checkpoint_converts_exactly_and_defaults_to_bf16(starter_checkpoint: Path, tmp_path: Path) -> None:
    from pocketlm.models.gguf_info import read_gguf

    checkpoint = build_tiny_model("llama", tmp_path / "checkpoint", starter_checkpoint, dtype="bfloat16")
    expected = transformers_logits(checkpoint, TOKEN_IDS)  # transformers upcasts the bf16 weights to float32
    f32 = HfToGGUF().convert(checkpoint, tmp_path / "f32.gguf", ConvertOptions(settings=GGUFSettings(outtype="f32")), ignore_progress).path
    assert np.abs(llama_cpp_logits(f32, TOKEN_IDS) - expected).max() / np.abs(expected).max() < 1e-4
    # f16 holds values up to 65504 only; bf16 weights keep their own type unless asked otherwise.
    auto = HfToGGUF().convert(checkpoint, tmp_path / "auto.gguf", ConvertOptions(), ignore_progress).path
    assert read_gguf(auto).quantization == "BF16"


CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, Ærøskøbing, Zürich — “quotes” and ‘apostrophes’ don't fail.",
    "日本語のテキストと中文字符，还有한국어 문장도 있습니다。",
    "Emoji: 🤖🚀👍🏽 and a family 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Numbers: 3.14159, 1,234,567, 2026-11-23, 0x1F, 10^9 and 007.",
    "Runs   of    spaces,\ttabs\t\tand\n\n\nnewlines\r\n and trailing space ",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and <|endoftext|> inside text",
    "Ünïcödé ßtrange cases: İstanbul, ǅemal, ﬁne ligatures, ＦＵＬＬＷＩＤＴＨ.",
]


def test_tokenizer_matches_the_checkpoints_id_for_id(starter_checkpoint: Path, converted_f16: Path) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(starter_checkpoint)
    vocab = llama_cpp.Llama(str(converted_f16), vocab_only=True, verbose=False)
    try:
        for text in CORPUS:
            expected = reference(text, add_special_tokens=False)["input_ids"]
            # special=True: llama.cpp then reads <|im_start|> and friends as the single tokens HF makes of them.
            assert vocab.tokenize(text.encode(), add_bos=False, special=True) == expected, text
    finally:
        vocab.close()


def test_a_sentencepiece_tokenizer_matches_too(tmp_path: Path) -> None:
    import llama_cpp
    import sentencepiece
    from transformers import AutoTokenizer

    from tests.converters.tiny_models import train_sentencepiece_tokenizer

    tokenizer = train_sentencepiece_tokenizer(tmp_path / "tokenizer")
    checkpoint = build_tiny_model("llama", tmp_path / "checkpoint", tokenizer, vocab_size=600)
    gguf = HfToGGUF().convert(checkpoint, tmp_path / "model.gguf", ConvertOptions(settings=GGUFSettings(outtype="f32")), ignore_progress).path
    reference = AutoTokenizer.from_pretrained(checkpoint)
    original = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    try:
        matched_hf = 0
        for text in CORPUS:
            ours = vocab.tokenize(text.encode(), add_bos=False, special=True)
            hf = reference(text, add_special_tokens=False)["input_ids"]
            if hf == original.encode(text):
                assert ours == hf, text
                matched_hf += 1
            else:
                # transformers' conversion of a SentencePiece model departs from SentencePiece itself on leading runs
                # of spaces; there llama.cpp must match the model's own tokenizer.
                assert ours == original.encode(text), text
        assert matched_hf >= len(CORPUS) - 1
        assert vocab.tokenize(b"Hello", add_bos=True)[0] == reference("Hello")["input_ids"][0] == 1  # <s> first, as HF adds it
    finally:
        vocab.close()
