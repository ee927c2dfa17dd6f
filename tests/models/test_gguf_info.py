"""A GGUF is checked before llama.cpp maps it: a damaged file gets a sentence, never a crash."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pocketlm.models.errors import ModelFileError
from pocketlm.models.gguf_info import read_gguf


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
        ("x", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0), "an array nested in an array"),
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
    with pytest.raises(ModelFileError, match="metadata is inconsistent"):
        read_gguf(architecture)
