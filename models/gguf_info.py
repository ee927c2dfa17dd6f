"""Read and check a GGUF file's header before any engine maps it.

The `gguf` package's GGUFReader builds a numpy view for every vocabulary string, which takes seconds on a
49k-token vocabulary; opening a model must not. So this walks the header once with `struct`, taking the format's
constants (value types, quantization block sizes) from `gguf`, and checks that every tensor lies inside the file:
a truncated or damaged file is refused here instead of crashing llama.cpp.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
_MAX_DECODED_ARRAY = 4096


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

    def unpack(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise _Truncated
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return value

    def string(self, keep: bool = True) -> str | None:
        length = int(self.unpack("Q"))  # type: ignore[call-overload]
        if self.offset + length > len(self.data):
            raise _Truncated
        start = self.offset
        self.offset += length
        return bytes(self.data[start : self.offset]).decode("utf-8", errors="replace") if keep else None

    def value(self, value_type: int, keep_strings: bool = True, nested: bool = False) -> object:
        if value_type == _STRING:
            return self.string(keep=keep_strings or not nested)
        if value_type == _ARRAY:
            if nested:
                raise ValueError("an array nested in an array")
            item_type, count = int(self.unpack("I")), int(self.unpack("Q"))  # type: ignore[call-overload]
            if item_type in _SCALAR_FORMATS:
                item_size = struct.calcsize(_SCALAR_FORMATS[item_type])
                if self.offset + item_size * count > len(self.data):
                    raise _Truncated
                start = self.offset
                self.offset += item_size * count
                # Per-layer values are decoded; vocabulary-sized arrays (scores, token types) are only skipped.
                return list(struct.unpack_from(f"<{count}{_SCALAR_FORMATS[item_type]}", self.data, start)) if count <= _MAX_DECODED_ARRAY else None
            if count > len(self.data):
                raise _Truncated
            items = [self.value(item_type, keep_strings, nested=True) for _ in range(count)]
            return items if keep_strings else None
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        raise ValueError(f"unknown metadata value type {value_type}")


def _damaged(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"{path.name} is {what}.", "Download or convert the model again.")


def read_gguf(path: Path) -> GGUFSummary:
    """Summarise `path`, refusing files that are not GGUF, truncated, or whose tensors point outside the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

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
            cursor = _HeaderCursor(data)
            cursor.offset = 4
            try:
                version = int(cursor.unpack("I"))  # type: ignore[call-overload]
                if version not in (2, 3):
                    raise _damaged(path, f"a GGUF version {version} file, which this reader does not know")
                tensor_count, kv_count = int(cursor.unpack("Q")), int(cursor.unpack("Q"))  # type: ignore[call-overload]
                if tensor_count > file_size or kv_count > file_size:
                    raise _damaged(path, "corrupted: its header counts are impossible for its size")
                metadata: dict[str, object] = {}
                for _ in range(kv_count):
                    key = cursor.string()
                    value_type = int(cursor.unpack("I"))  # type: ignore[call-overload]
                    keep = key == "tokenizer.ggml.tokens"
                    metadata[key] = cursor.value(value_type, keep_strings=keep)
                tensor_extents: list[tuple[str, int, int, int]] = []
                for _ in range(tensor_count):
                    name = cursor.string()
                    n_dims = int(cursor.unpack("I"))  # type: ignore[call-overload]
                    if n_dims > 8:
                        raise _damaged(path, f"corrupted: tensor {name} claims {n_dims} dimensions")
                    n_elements = 1
                    for _ in range(n_dims):
                        n_elements *= int(cursor.unpack("Q"))  # type: ignore[call-overload]
                    type_id, offset = int(cursor.unpack("I")), int(cursor.unpack("Q"))  # type: ignore[call-overload]
                    try:
                        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
                    except (ValueError, KeyError):
                        raise _damaged(path, f"corrupted or too new: tensor {name} has unknown type {type_id}") from None
                    tensor_extents.append((name, offset, n_elements * type_size // block_size, n_elements))
            except _Truncated:
                raise _damaged(path, "truncated: its GGUF header ends before it should") from None
            except ValueError as error:
                raise _damaged(path, f"corrupted ({error})") from None
            header_end = cursor.offset

    try:
        return _summarise(path, file_size, metadata, tensor_extents, header_end)
    except (ValueError, TypeError) as error:  # metadata of the wrong type or shape for its key
        raise _damaged(path, f"corrupted: its metadata is inconsistent ({error})") from None


def _summarise(path: Path, file_size: int, metadata: dict[str, object], tensor_extents: list[tuple[str, int, int, int]], header_end: int) -> GGUFSummary:
    from gguf.constants import LlamaFileType

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))  # type: ignore[call-overload]
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    data_start = header_end + (-header_end % alignment)
    for name, offset, n_bytes, _ in tensor_extents:
        end = data_start + offset + n_bytes
        if end > file_size:
            raise _damaged(path, f"truncated: tensor {name} ends at byte {end:,} but the file has {file_size:,}")

    architecture = str(metadata.get("general.architecture", "unknown"))

    def arch_int(key: str, default: int = 0) -> int:
        value = metadata.get(f"{architecture}.{key}", default)
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv in some models): the largest one
            value = max(value, default=default)
        return int(value)  # type: ignore[call-overload]

    tokens = metadata.get("tokenizer.ggml.tokens")

    def token_text(key: str) -> str:
        token_id = metadata.get(key)
        if not isinstance(tokens, list) or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            return ""
        return str(tokens[token_id])

    file_type = metadata.get("general.file_type")
    try:
        quantization = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"  # type: ignore[call-overload]
    except ValueError:
        quantization = f"type {file_type}"
    template = metadata.get("tokenizer.chat_template")
    head_count = arch_int("attention.head_count", 1)
    return GGUFSummary(
        path=path,
        file_size=file_size,
        architecture=architecture,
        name=str(metadata.get("general.name", path.stem)),
        context_length=arch_int("context_length", 2048),
        block_count=arch_int("block_count"),
        embedding_length=arch_int("embedding_length"),
        head_count=head_count,
        head_count_kv=arch_int("attention.head_count_kv", head_count),
        parameter_count=sum(extent[3] for extent in tensor_extents),
        quantization=quantization,
        chat_template=str(template) if template else None,
        bos_token=token_text("tokenizer.ggml.bos_token_id"),
        eos_token=token_text("tokenizer.ggml.eos_token_id"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
    )
