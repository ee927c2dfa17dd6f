"""A GGUF is checked before llama.cpp maps it: a damaged file gets a sentence, never a crash."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGUFValueType, GGUFWriter

from pocketlm.models.errors import ModelFileError
from pocketlm.models.gguf_info import read_gguf
from tests.backends.tiny_gguf import N_EMBD, N_FF, tiny_llama_gguf_path, write_tiny_llama_gguf


def test_starter_model_summary(starter_gguf: Path) -> None:
    summary = read_gguf(starter_gguf)
    assert summary.architecture == "llama"
    assert summary.quantization == "Q4_1"
    assert summary.context_length == 8192
    assert (summary.block_count, summary.head_count, summary.head_count_kv, summary.embedding_length) == (30, 9, 3, 576)
    assert 130e6 < summary.parameter_count < 140e6
    assert summary.chat_template and "<|im_start|>" in summary.chat_template
    assert (summary.bos_token, summary.eos_token, summary.add_bos_token) == ("<|im_start|>", "<|im_end|>", False)
    # 30 layers × 3 KV heads × 64 dims × (K + V) × 2 bytes
    assert summary.kv_bytes_per_token == 30 * 3 * 64 * 2 * 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_tensor_data(starter_gguf: Path, tmp_path: Path, keep_fraction: float) -> None:
    data = starter_gguf.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelFileError, match="truncated: tensor .* ends at byte"):
        read_gguf(path)


def test_truncated_header(starter_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "header-only.gguf"
    with starter_gguf.open("rb") as source:
        path.write_bytes(source.read(200_000))  # ends inside the vocabulary
    with pytest.raises(ModelFileError, match="truncated: its GGUF header ends"):
        read_gguf(path)


def test_impossible_tensor_type(starter_gguf: Path, tmp_path: Path) -> None:
    """Overwrite the first tensor's type id with 9999, as bit rot in the header might."""
    data = bytearray(starter_gguf.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 9999)
    path = tmp_path / "bad-type.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="unknown type 9999"):
        read_gguf(path)


def crafted_gguf(path: Path, key: str, value_type: int, payload: bytes) -> Path:
    """A GGUF v3 header with no tensors and one metadata entry, written byte by byte as the spec lays it out."""
    encoded_key = key.encode()
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(encoded_key)) + encoded_key + struct.pack("<I", value_type)
    path.write_bytes(header + payload)
    return path


@pytest.mark.parametrize(
    ("key", "value_type", "payload", "message"),
    [
        ("general.alignment", 4, struct.pack("<I", 0), "alignment 0 is not a power of two"),
        ("x", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0), "array of value type 9, which GGUF does not allow"),
        ("general.architecture", 8, struct.pack("<Q", 2**60), "truncated"),
        ("x", 9, struct.pack("<IQ", 8, 2**62), "truncated"),
    ],
    ids=["zero-alignment", "nested-array", "huge-string", "huge-array"],
)
def test_crafted_headers_are_refused_cleanly(tmp_path: Path, key: str, value_type: int, payload: bytes, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        read_gguf(crafted_gguf(tmp_path / "crafted.gguf", key, value_type, payload))


def test_wrongly_typed_metadata_is_refused_cleanly(tmp_path: Path) -> None:
    architecture = crafted_gguf(tmp_path / "a.gguf", "general.architecture", 8, struct.pack("<Q", 5) + b"llama")
    data = bytearray(architecture.read_bytes())
    struct.pack_into("<Q", data, 16, 2)  # two metadata entries: add llama.block_count as a string
    key = b"llama.block_count"
    data += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", 3) + b"ten"
    architecture.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="llama.block_count is a STRING where llama.cpp reads a UINT32"):
        read_gguf(architecture)


# Each check below mirrors a llama.cpp abort or refusal (see models/gguf_checks.py); the tiny model is the healthy base.


@pytest.fixture(scope="module")
def tiny_gguf() -> Path:
    return tiny_llama_gguf_path()


def refusal(path: Path) -> str:
    """The sentence read_gguf refuses `path` with (the test fails if it accepts it)."""
    with pytest.raises(ModelFileError) as refused:
        read_gguf(path)
    assert refused.value.hint == "Download or convert the model again."
    assert str(refused.value).startswith(path.name)
    return str(refused.value)


def tiny_variant(tmp_path: Path, customize: Callable[[GGUFWriter], None]) -> Path:
    return write_tiny_llama_gguf(tmp_path / "variant.gguf", customize)


def set_key(key: str, value: object, value_type: GGUFValueType, sub_type: GGUFValueType | None = None) -> Callable[[GGUFWriter], None]:
    return lambda writer: writer.add_key_value(key, value, value_type, sub_type)


def test_the_tiny_model_passes_every_check(tiny_gguf: Path) -> None:
    summary = read_gguf(tiny_gguf)
    assert (summary.architecture, summary.block_count, summary.eos_token) == ("llama", 2, "<|im_end|>")


def duplicate_one_token(writer: GGUFWriter) -> None:
    tokens = list(writer.kv_data[0]["tokenizer.ggml.tokens"].value)
    tokens[100] = tokens[101]
    writer.add_key_value("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)


def test_duplicate_vocabulary_token_is_refused_with_a_sentence(tmp_path: Path) -> None:
    message = refusal(tiny_variant(tmp_path, duplicate_one_token))
    assert "vocabulary tokens 100 and 101 are both" in message


def test_empty_tokens_do_not_count_as_duplicates(tmp_path: Path) -> None:
    """llama.cpp renames an empty token "[EMPTY_<id>]" before it checks, so two empty tokens are allowed."""

    def empty_two(writer: GGUFWriter) -> None:
        tokens = list(writer.kv_data[0]["tokenizer.ggml.tokens"].value)
        tokens[100] = tokens[101] = ""
        writer.add_key_value("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)

    read_gguf(tiny_variant(tmp_path, empty_two))


@pytest.mark.parametrize(
    ("key", "length", "item_type"),
    [("tokenizer.ggml.token_type", 300, GGUFValueType.INT32), ("tokenizer.ggml.scores", 200, GGUFValueType.FLOAT32)],
    ids=["short-token-types", "short-scores"],
)
def test_vocabulary_arrays_shorter_than_the_vocabulary_are_refused(tmp_path: Path, key: str, length: int, item_type: GGUFValueType) -> None:
    path = tiny_variant(tmp_path, set_key(key, [1] * length, GGUFValueType.ARRAY, item_type))
    assert f"{key} holds {length} entries for a vocabulary of 320 tokens" in refusal(path)


def test_a_longer_scores_array_is_accepted_as_llama_cpp_accepts_it(tmp_path: Path) -> None:
    read_gguf(tiny_variant(tmp_path, set_key("tokenizer.ggml.scores", [0.0] * 400, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)))


def test_token_types_of_another_type_are_refused(tmp_path: Path) -> None:
    path = tiny_variant(tmp_path, set_key("tokenizer.ggml.token_type", [1] * 320, GGUFValueType.ARRAY, GGUFValueType.UINT8))
    assert "tokenizer.ggml.token_type is not an array of INT32" in refusal(path)


@pytest.mark.parametrize("key", ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"])
def test_special_token_outside_the_vocabulary_is_ignored_as_llama_cpp_ignores_it(tmp_path: Path, key: str) -> None:
    summary = read_gguf(tiny_variant(tmp_path, set_key(key, 320, GGUFValueType.UINT32)))
    if key.endswith("eos_token_id"):
        assert summary.eos_token == "", "no token text for an id llama.cpp disables"


@pytest.mark.parametrize(
    "key", ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.prefix_token_id"]
)
def test_a_special_token_id_llama_cpp_reads_must_be_a_uint32(tmp_path: Path, key: str) -> None:
    assert f"{key} is a INT32 where llama.cpp reads a UINT32" in refusal(tiny_variant(tmp_path, set_key(key, 1, GGUFValueType.INT32)))


@pytest.mark.parametrize(
    ("key", "value", "value_type"),
    [
        ("tokenizer.ggml.cls_token_id", 1, GGUFValueType.INT32),
        ("tokenizer.ggml.image_token_id", -1, GGUFValueType.INT64),
        ("tokenizer.ggml.think_token_id", "<think>", GGUFValueType.STRING),
    ],
    ids=["int32-cls", "int64-image", "string-think"],
)
def test_token_id_keys_llama_cpp_never_reads_may_have_any_type(tmp_path: Path, key: str, value: object, value_type: GGUFValueType) -> None:
    read_gguf(tiny_variant(tmp_path, set_key(key, value, value_type)))


def test_alignment_that_is_not_a_uint32_is_refused(tmp_path: Path) -> None:
    """Regression: a UINT64 general.alignment (even 32, the layout's own) passed the old checks; llama.cpp requires UINT32."""
    path = tiny_variant(tmp_path, set_key("general.alignment", 32, GGUFValueType.UINT64))
    assert "general.alignment is a UINT64 where llama.cpp reads a UINT32" in refusal(path)


def test_a_uint32_alignment_of_the_layout_passes(tmp_path: Path) -> None:
    read_gguf(tiny_variant(tmp_path, set_key("general.alignment", 32, GGUFValueType.UINT32)))


def test_alignment_that_is_not_a_power_of_two_is_refused(tmp_path: Path) -> None:
    path = tiny_variant(tmp_path, set_key("general.alignment", 48, GGUFValueType.UINT32))
    assert "general.alignment 48 is not a power of two" in refusal(path)


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"llama.expert_count": 4, "llama.expert_used_count": 8}, "llama.expert_used_count is 8 but llama.expert_count is 4"),
        ({"llama.expert_used_count": 2}, "llama.expert_used_count is 2 without any experts"),
        ({"llama.expert_count": 4}, "llama.expert_count is 4 but no expert is used"),
        ({"llama.expert_count": 2000, "llama.expert_used_count": 2}, "llama.expert_count is 2,000 (llama.cpp allows at most 1024)"),
    ],
    ids=["used-more-than-count", "used-without-count", "count-without-used", "too-many-experts"],
)
def test_inconsistent_expert_counts_are_refused(tmp_path: Path, counts: dict[str, int], message: str) -> None:
    def add_counts(writer: GGUFWriter) -> None:
        for key, value in counts.items():
            writer.add_key_value(key, value, GGUFValueType.UINT32)

    assert message in refusal(tiny_variant(tmp_path, add_counts))


def test_expert_tensors_that_disagree_with_the_expert_count_are_refused(tmp_path: Path) -> None:
    import numpy as np

    def three_experts_in_a_four_expert_model(writer: GGUFWriter) -> None:
        writer.add_expert_count(4)
        writer.add_expert_used_count(2)
        writer.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((3, N_FF, N_EMBD), dtype=np.float16))

    message = refusal(tiny_variant(tmp_path, three_experts_in_a_four_expert_model))
    assert "tensor blk.0.ffn_up_exps.weight holds 3 experts but llama.expert_count is 4" in message


def test_expert_tensors_without_an_expert_count_are_refused(tmp_path: Path) -> None:
    import numpy as np

    def experts_without_count(writer: GGUFWriter) -> None:
        writer.add_tensor("blk.0.ffn_down_exps.weight", np.zeros((2, N_EMBD, N_FF), dtype=np.float16))

    assert "holds 2 experts but llama.expert_count is 0" in refusal(tiny_variant(tmp_path, experts_without_count))


@pytest.mark.parametrize(
    ("key", "value", "value_type", "message"),
    [
        ("llama.context_length", 256, GGUFValueType.INT32, "llama.context_length is a INT32 where llama.cpp reads a UINT32"),
        ("tokenizer.ggml.bos_token_id", 1, GGUFValueType.INT64, "bos_token_id is a INT64 where llama.cpp reads a UINT32"),
        ("tokenizer.ggml.model", 2, GGUFValueType.UINT32, "tokenizer.ggml.model is a UINT32 where llama.cpp reads a STRING"),
        ("llama.block_count", 0, GGUFValueType.UINT32, "llama.block_count is 0 (llama.cpp allows 1 to 512)"),
        ("llama.block_count", 513, GGUFValueType.UINT32, "llama.block_count is 513"),
        ("llama.rope.scaling.type", "linaer", GGUFValueType.STRING, "llama.rope.scaling.type is 'linaer', which llama.cpp does not know"),
        ("llama.attention.layer_norm_rms_epsilon", float("nan"), GGUFValueType.FLOAT32, "layer_norm_rms_epsilon is nan"),
        ("llama.attention.layer_norm_rms_epsilon", -1e-5, GGUFValueType.FLOAT32, "layer_norm_rms_epsilon is -1e-05"),
    ],
    ids=["int32-context", "int64-bos", "numeric-tokenizer", "no-layers", "too-many-layers", "unknown-rope-scaling", "nan-epsilon", "negative-epsilon"],
)
def test_known_keys_of_the_wrong_type_or_range_are_refused(tmp_path: Path, key: str, value: object, value_type: GGUFValueType, message: str) -> None:
    assert message in refusal(tiny_variant(tmp_path, set_key(key, value, value_type)))


def with_tensor_field(source: Path, destination: Path, tensor: str, edit: Callable[[bytearray, int, int], None]) -> Path:
    """Copy `source`, letting `edit(data, at, n_dims)` change `tensor`'s info, which starts at `at` with its n_dims."""
    data = bytearray(source.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    edit(data, at, struct.unpack_from("<I", data, at)[0])
    destination.write_bytes(bytes(data))
    return destination


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda data, at, n: struct.pack_into("<Q", data, at + 4, 2**64 - 5), "has a dimension of -5"),
        (lambda data, at, n: struct.pack_into("<QQ", data, at + 4, 2**40, 2**40), "whose element count overflows 64 bits"),
        (lambda data, at, n: struct.pack_into("<I", data, at + 4 + 8 * n, 12), "rows of 64 values, not a multiple of Q4_K's block of 256"),
        (lambda data, at, n: struct.pack_into("<Q", data, at + 8 + 8 * n, 8), "data offset 8 is not a multiple of the alignment 32"),
        (lambda data, at, n: struct.pack_into("<Q", data, at + 8 + 8 * n, 4096), "data starts at offset 4,096 where it should start at"),
        (lambda data, at, n: struct.pack_into("<I", data, at, 5), "claims 5 dimensions (at most 4)"),
    ],
    ids=["negative-dimension", "overflowing-shape", "partial-block", "unaligned-offset", "offset-gap", "five-dimensions"],
)
def test_impossible_tensor_info_is_refused(tiny_gguf: Path, tmp_path: Path, edit: Callable[[bytearray, int, int], None], message: str) -> None:
    assert message in refusal(with_tensor_field(tiny_gguf, tmp_path / "edited.gguf", "blk.0.attn_q.weight", edit))


def test_a_zero_element_tensor_is_accepted_as_gguf_cpp_accepts_it(tmp_path: Path) -> None:
    """gguf.cpp refuses negative dimensions and overflowing shapes only; a dimension of 0 is a valid, empty tensor."""
    import numpy as np

    summary = read_gguf(tiny_variant(tmp_path, lambda writer: writer.add_tensor("extra.weight", np.zeros((0, N_EMBD), dtype=np.float16))))
    assert summary.parameter_count == read_gguf(tiny_llama_gguf_path()).parameter_count


def test_a_zero_dimension_does_not_hide_an_earlier_overflow(tiny_gguf: Path, tmp_path: Path) -> None:
    """gguf.cpp multiplies the dimensions in order and refuses as soon as the product overflows, even if a later one is 0."""

    def three_dimensions(data: bytearray, at: int, n_dims: int) -> None:
        assert n_dims == 2
        # Grow attn_q's two dimensions to three in place: (2^40, 2^40, 0), shifting the rest of the file by 8 bytes.
        data[at : at + 4 + 16] = struct.pack("<IQQQ", 3, 2**40, 2**40, 0)

    path = with_tensor_field(tiny_gguf, tmp_path / "edited.gguf", "blk.0.attn_q.weight", three_dimensions)
    assert "has shape [1099511627776, 1099511627776, 0], whose element count overflows 64 bits" in refusal(path)


def test_a_shape_whose_size_in_bytes_overflows_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    """2^62 F32 values: a count that fits in an int64, a size (2^64 bytes) that does not fit in 64 bits."""

    def huge_f32(data: bytearray, at: int, n_dims: int) -> None:
        struct.pack_into("<QQ", data, at + 4, 2**31, 2**31)  # 2^62 elements
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, 0)  # F32: 4 bytes each, 2^64 bytes in all

    path = with_tensor_field(tiny_gguf, tmp_path / "edited.gguf", "blk.0.attn_q.weight", huge_f32)
    assert "whose size in bytes overflows 64 bits" in refusal(path)
