"""Read a safetensors file's header (tensor names, dtypes, shapes) without touching its data, and check its extent."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from pocketlm.models.errors import ModelFileError

# Real headers are a few MB at most (a tensor name and offsets per tensor); anything larger is damage, not a model.
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def element_count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of `path`; a file too short for the tensors its header lists is refused as truncated."""
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
        raise ModelFileError(f"{path.name} is truncated: its header is cut short.", "Download or export it again.")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path.name} is not a safetensors file (its header is not JSON).") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path.name} is not a safetensors file (its header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    data_size = file_size - 8 - header_length
    tensors = []
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            tensors.append(TensorEntry(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"])))
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path.name} has a malformed entry for tensor {name!r}.") from None
        if not 0 <= start <= end or end > data_size:
            raise ModelFileError(
                f"{path.name} is truncated: tensor {name!r} ends at byte {end} of data but the file holds {data_size}.",
                "Download or export it again.",
            )
    return SafetensorsHeader(tuple(tensors), {str(k): str(v) for k, v in metadata.items()})
