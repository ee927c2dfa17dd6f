"""Read and check a GGUF file's header before any engine maps it.

The `gguf` package's GGUFReader builds a numpy view for every vocabulary string, which takes seconds on a
49k-token vocabulary; opening a model must not. So this walks the header once with `struct`, taking the format's
constants (value types, quantization block sizes) from `gguf`, and hands what it read to `gguf_checks`, which
refuses every damage known to abort llama.cpp: a damaged file gets a sentence here instead of killing the process.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.errors import ModelFileError
from pocketlm.models.gguf_checks import GGUFHeader, HeaderDamage, TensorInfo, check_header

GGUF_MAGIC = b"GGUF"
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DECODED_ARRAY = 4096
_TOKENS_KEY = "tokenizer.ggml.tokens"
# llama.cpp's limits (ggml.h): GGML_MAX_DIMS dimensions; GGML_MAX_NAME bytes for a tensor name, its NUL included.
_MAX_DIMS = 4
_MAX_NAME = 64
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1
DAMAGED_MODEL_HINT = "Download or convert the model again."


@dataclass(frozen=True)
class GGUFSummary:
    """What pocketlm needs to know about a GGUF model without loading it."""

    path: Path
    file_size: int
    architecture: str
    name: str
    context_length: int
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    parameter_count: int
    quantization: str
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos_token: bool
    kind: str = "model"  # general.type: "model", or "adapter" for a LoRA adapter applied on top of a model

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 K and V cache one token of context costs across all layers."""
        head_dim = self.embedding_length // max(self.head_count, 1)
        return 2 * 2 * self.block_count * self.head_count_kv * head_dim


class _Truncated(Exception):
    pass


class _HeaderCursor:
    """Sequential little-endian reads over the mapped file; any read past the end raises _Truncated."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return value  # type: ignore[no-any-return]

    def raw_string(self) -> bytes:
        length = self.unpack("Q")
        if self.offset + length > len(self.data):
            raise _Truncated
        start = self.offset
        self.offset += length
        return self.data[start : self.offset]

    def skip_string(self) -> None:
        length = self.unpack("Q")
        self.offset += length
        if self.offset > len(self.data):
            raise _Truncated

    def string(self) -> str:
        return self.raw_string().decode("utf-8", errors="replace")


def _read_value(cursor: _HeaderCursor, key: str, value_type: int, header: GGUFHeader) -> object:
    """One metadata value; arrays are recorded in `header.arrays` and decoded only when small or needed."""
    if value_type == _STRING:
        return cursor.string()
    if value_type in _SCALAR_FORMATS:
        return cursor.unpack(_SCALAR_FORMATS[value_type])
    if value_type != _ARRAY:
        raise HeaderDamage(f"metadata {key} has unknown value type {value_type}")
    item_type, count = cursor.unpack("I"), cursor.unpack("Q")
    header.arrays[key] = (item_type, count)
    if item_type in _SCALAR_FORMATS:
        item_size = struct.calcsize(_SCALAR_FORMATS[item_type])
        if cursor.offset + item_size * count > len(cursor.data):
            raise _Truncated
        start = cursor.offset
        cursor.offset += item_size * count
        # Per-layer values are decoded; vocabulary-sized arrays (scores, token types) are only measured.
        return list(struct.unpack_from(f"<{count}{_SCALAR_FORMATS[item_type]}", cursor.data, start)) if count <= _MAX_DECODED_ARRAY else None
    if item_type != _STRING:
        raise HeaderDamage(f"metadata {key} is an array of value type {item_type}, which GGUF does not allow")
    if count > len(cursor.data) // 8:  # every string costs at least its 8-byte length
        raise _Truncated
    if key == _TOKENS_KEY:
        # Kept as bytes: llama.cpp compares tokens byte for byte, and two different invalid UTF-8 tokens must not
        # look equal after decoding.
        return [cursor.raw_string() for _ in range(count)]
    for _ in range(count):
        cursor.skip_string()
    return None


def _read_tensor(cursor: _HeaderCursor) -> TensorInfo:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # gguf imports numpy: not at `pocketlm --help`

    raw_name = cursor.raw_string()
    name = raw_name.decode("utf-8", errors="replace")
    if len(raw_name) >= _MAX_NAME:
        raise HeaderDamage(f"tensor name {name[:40]!r}… is {len(raw_name)} bytes long (llama.cpp allows {_MAX_NAME - 1})")
    n_dims = cursor.unpack("I")
    if n_dims > _MAX_DIMS:
        raise HeaderDamage(f"tensor {name} claims {n_dims} dimensions (at most {_MAX_DIMS})")
    shape = tuple(cursor.unpack("Q") for _ in range(n_dims))
    type_id, offset = cursor.unpack("I"), cursor.unpack("Q")
    # gguf.cpp's rules, to the letter: each dimension is an int64 that must not be negative (0 is allowed: a
    # zero-element tensor), the running product of the dimensions must not overflow int64, nor the size in bytes 64 bits.
    for dim in shape:
        if dim > _INT64_MAX:
            raise HeaderDamage(f"tensor {name} has a dimension of {dim - 2**64}")
    n_elements = shape[0] if shape else 1
    for dim in shape[1:]:
        if dim > 1 and n_elements > _INT64_MAX // dim:
            raise HeaderDamage(f"tensor {name} has shape {list(shape)}, whose element count overflows 64 bits")
        n_elements *= dim
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise HeaderDamage(f"tensor {name} has unknown type {type_id} (corrupted, or too new for this reader)") from None
    row_length = shape[0] if shape else 1  # gguf.cpp counts a missing dimension as 1
    if row_length % block_size:
        type_name = GGMLQuantizationType(type_id).name
        raise HeaderDamage(f"tensor {name} has rows of {row_length} values, not a multiple of {type_name}'s block of {block_size}")
    if n_elements // block_size > _UINT64_MAX // type_size:
        raise HeaderDamage(f"tensor {name} has shape {list(shape)}, whose size in bytes overflows 64 bits")
    return TensorInfo(name, shape, type_id, offset, n_elements * type_size // block_size, n_elements)


def _read_header(path: Path, data: mmap.mmap, file_size: int) -> GGUFHeader:
    cursor = _HeaderCursor(data)
    cursor.offset = 4
    version = cursor.unpack("I")
    if version not in (2, 3):
        raise ModelFileError(f"{path.name} is a GGUF version {version} file, which this reader does not know.", DAMAGED_MODEL_HINT)
    tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
    if tensor_count > file_size or kv_count > file_size:
        raise HeaderDamage("its header counts are impossible for its size")
    header = GGUFHeader(file_size=file_size)
    for _ in range(kv_count):
        key = cursor.string()
        if not key:
            raise HeaderDamage("a metadata key is empty")
        if key in header.value_types:
            raise HeaderDamage(f"metadata key {key} appears twice")
        value_type = cursor.unpack("I")
        header.value_types[key] = value_type
        header.metadata[key] = _read_value(cursor, key, value_type, header)
    seen: set[str] = set()
    for _ in range(tensor_count):
        tensor = _read_tensor(cursor)
        if tensor.name in seen:
            raise HeaderDamage(f"tensor {tensor.name} appears twice")
        seen.add(tensor.name)
        header.tensors.append(tensor)
    header.header_end = cursor.offset
    return header


def _damaged(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"{path.name} is {what}.", DAMAGED_MODEL_HINT)


def read_gguf(path: Path) -> GGUFSummary:
    """Summarise `path`, refusing files that are not GGUF, truncated, or damaged in a way known to abort llama.cpp."""
    path = Path(path)
    header = read_gguf_header(path)
    try:
        return _summarise(path, header)
    except (ValueError, TypeError) as error:  # metadata of the wrong type or shape for its key
        raise _damaged(path, f"corrupted: its metadata is inconsistent ({error})") from None


def read_gguf_header(path: Path) -> GGUFHeader:
    """`path`'s metadata and tensor list (shapes in ggml order: the row length first), checked as read_gguf checks them."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Model file {path} does not exist.", "Check the path, or run `pocketlm ls` to see your models.")
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelFileError(
                f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes).",
                "llama.cpp needs a .gguf model; convert the checkpoint first.",
            )
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                header = _read_header(path, data, file_size)
            except _Truncated:
                raise _damaged(path, "truncated: its GGUF header ends before it should") from None
            except HeaderDamage as damage:
                raise _damaged(path, f"corrupted: {damage}") from None
    try:
        check_header(header)
    except HeaderDamage as damage:
        if damage.truncated:
            raise _damaged(path, f"truncated: {damage}") from None
        raise _damaged(path, f"corrupted: {damage}") from None
    except (ValueError, TypeError) as error:  # metadata of the wrong type or shape for its key
        raise _damaged(path, f"corrupted: its metadata is inconsistent ({error})") from None
    return header


def _summarise(path: Path, header: GGUFHeader) -> GGUFSummary:
    from gguf.constants import LlamaFileType

    metadata = header.metadata
    architecture = header.architecture
    arch_int = header.arch_value  # per-layer values (e.g. head_count_kv in some models): the largest one

    tokens = header.tokens

    def token_text(key: str) -> str:
        token_id = metadata.get(key)
        if tokens is None or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            return ""
        return tokens[token_id].decode("utf-8", errors="replace")

    file_type = metadata.get("general.file_type")
    try:
        quantization = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"  # type: ignore[call-overload]
    except ValueError:
        quantization = f"type {file_type}"
    template = metadata.get("tokenizer.chat_template")
    head_count = arch_int("attention.head_count", 1)
    return GGUFSummary(
        path=path,
        file_size=header.file_size,
        architecture=architecture,
        name=str(metadata.get("general.name", path.stem)),
        context_length=arch_int("context_length", 2048),
        block_count=arch_int("block_count"),
        embedding_length=arch_int("embedding_length"),
        head_count=head_count,
        head_count_kv=arch_int("attention.head_count_kv", head_count),
        parameter_count=sum(tensor.n_elements for tensor in header.tensors),
        quantization=quantization,
        chat_template=str(template) if template else None,
        bos_token=token_text("tokenizer.ggml.bos_token_id"),
        eos_token=token_text("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
        kind=str(metadata.get("general.type", "model")),
    )
