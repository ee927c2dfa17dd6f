"""Read a safetensors file's header (tensor names, dtypes, shapes, where each tensor's bytes are) without touching its
data, and check that every tensor is as long as its shape and dtype say and lies inside the file."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.models.errors import ModelFileError

if TYPE_CHECKING:
    import numpy as np

# Real headers are a few MB at most (a tensor name and offsets per tensor); anything larger is damage, not a model.
_MAX_HEADER_BYTES = 100 * 2**20
# Bits per element of every dtype the safetensors format defines (safetensors' `Dtype` enum). The sub-byte float
# types pack elements, so a tensor's length is counted in bits first.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_REDOWNLOAD = "Download or export it again."


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # of the tensor's first byte in the file (header included)
    size: int = 0  # its length in bytes

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of `path`; a file too short for the tensors its header lists, or a tensor whose byte range does not
    match its shape and dtype, is refused with a sentence."""
    try:
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ModelFileError(f"{path.name} is not a safetensors file (it is {len(prefix)} bytes long).")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > _MAX_HEADER_BYTES:
                raise ModelFileError(f"{path.name} is not a safetensors file (its header claims {header_length} bytes).")
            raw = file.read(header_length)
            file_size = file.seek(0, 2)
    except OSError as error:
        raise ModelFileError(f"Cannot read {path}: {error.strerror or error}.") from None
    if len(raw) < header_length:
        raise ModelFileError(f"{path.name} is truncated: its header is cut short.", _REDOWNLOAD)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path.name} is not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name} is not a safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path.name} is not a safetensors file (its __metadata__ is not a JSON object).")
    data_start = 8 + header_length
    tensors = tuple(_entry(path, name, entry, data_start, file_size - data_start) for name, entry in header.items())
    return SafetensorsHeader(tensors, {str(k): str(v) for k, v in metadata.items()})


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorEntry:
    """One tensor's entry, checked: a known dtype, whole non-negative dimensions, a byte range inside the data that is
    exactly as long as the shape and dtype make it (a shorter range would read past it; a longer one is damage)."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and isinstance(shape, list) and all(map(_is_count, shape)) and isinstance(dtype, str)):  # fmt: skip
        raise ModelFileError(f"{path.name} has a malformed entry for tensor {name!r}.", _REDOWNLOAD)
    if dtype not in DTYPE_BITS:
        raise ModelFileError(f"{path.name} stores tensor {name!r} as {dtype!r}, a dtype safetensors does not define.", _REDOWNLOAD)
    start, end = offsets
    if end > data_size:
        raise ModelFileError(f"{path.name} is truncated: tensor {name!r} ends at byte {end} of data but the file holds {data_size}.", _REDOWNLOAD)
    expected_bits = math.prod(shape) * DTYPE_BITS[dtype]
    if start > end or (end - start) * 8 != expected_bits:
        raise ModelFileError(
            f"{path.name} is damaged: tensor {name!r} ({dtype}, shape {tuple(shape)}) should take {math.ceil(expected_bits / 8)} bytes, "
            f"but its header gives it bytes {start} to {end}.",
            _REDOWNLOAD,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + start, end - start)


def read_float_tensor(path: Path, entry: TensorEntry) -> np.ndarray:
    """The F32, F16 or BF16 tensor `entry` of `path` as float32, through a memory map (only its own bytes are read).
    numpy has no bfloat16, so BF16 is widened by shifting its bits into a float32's upper half."""
    import numpy as np

    raw = np.memmap(path, mode="r", dtype=np.uint8, offset=entry.offset, shape=(entry.size,))
    if entry.dtype == "F32":
        data = raw.view(np.float32)
    elif entry.dtype == "F16":
        data = raw.view(np.float16).astype(np.float32)
    elif entry.dtype == "BF16":
        data = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raise ModelFileError(f"Tensor {entry.name} in {path.name} is {entry.dtype}; only F32, F16 and BF16 tensors are read as floats.")
    return data.reshape(entry.shape)
