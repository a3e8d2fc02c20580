"""Reading and writing safetensors files byte for byte, without torch or pickle.

The format is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets), then the raw tensor bytes. We parse it
ourselves so fingerprints see exactly the stored bytes and a hostile file
cannot run code.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}

# Exponent-bit masks: a float is NaN or Inf exactly when all its exponent bits are set.
_NONFINITE_MASKS: dict[str, tuple[type[np.unsignedinteger], int]] = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7C),
}
_MAX_HEADER_BYTES = 100 << 20
_CHUNK = 1 << 20


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor's data in the file."""
    end: int
    """Absolute byte offset one past the tensor's data."""

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> info, checked against the file size and the dtype sizes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsError("file is shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise SafetensorsError(f"header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    return {name: _tensor_info(name, raw, data_start, size) for name, raw in header.items()}


def _tensor_info(name: str, raw: object, data_start: int, file_size: int) -> TensorInfo:
    if not isinstance(raw, dict):
        raise SafetensorsError(f"tensor {name!r} has a malformed header entry")
    try:
        dtype = str(raw["dtype"])
        shape = tuple(int(d) for d in raw["shape"])
        begin, end = (int(o) for o in raw["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SafetensorsError(f"tensor {name!r} has a malformed header entry") from exc
    if dtype not in DTYPE_SIZES:
        raise SafetensorsError(f"tensor {name!r} has unknown dtype {dtype!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if any(d < 0 for d in shape) or begin < 0 or end - begin != expected:
        raise SafetensorsError(f"tensor {name!r}: offsets do not match shape {list(shape)} {dtype}")
    if data_start + end > file_size:
        raise SafetensorsError(f"tensor {name!r} extends past the end of the file")
    return TensorInfo(name, dtype, shape, data_start + begin, data_start + end)


def iter_tensor_bytes(f: BinaryIO, info: TensorInfo) -> Iterator[bytes]:
    """The tensor's raw bytes in chunks, read from the open file ``f``."""
    f.seek(info.start)
    left = info.nbytes
    while left:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise SafetensorsError(f"tensor {info.name!r} is truncated")
        left -= len(chunk)
        yield chunk


def has_nonfinite(f: BinaryIO, info: TensorInfo) -> bool:
    """True if a floating-point tensor holds a NaN or an Inf (integer tensors never do)."""
    if info.dtype not in _NONFINITE_MASKS:
        return False
    kind, mask = _NONFINITE_MASKS[info.dtype]
    width = np.dtype(kind).itemsize
    pending = b""
    for chunk in iter_tensor_bytes(f, info):
        data = pending + chunk
        usable = len(data) - len(data) % width
        bits = np.frombuffer(data[:usable], dtype=kind)
        if np.any((bits & kind(mask)) == kind(mask)):
            return True
        pending = data[usable:]
    return False


def write_canonical(src: Path, tensors: dict[str, TensorInfo], dest: BinaryIO) -> None:
    """Write ``tensors`` from ``src`` as a canonical safetensors file to ``dest``.

    Canonical: names sorted, data packed in that order, compact sorted-key
    header padded to 8 bytes, metadata reduced to ``{"format": "pt"}``. The
    same tensors give the same bytes whatever tool wrote the source file.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    ordered = [tensors[name] for name in sorted(tensors)]
    for info in ordered:
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    dest.write(struct.pack("<Q", len(encoded)))
    dest.write(encoded)
    with src.open("rb") as f:
        for info in ordered:
            for chunk in iter_tensor_bytes(f, info):
                dest.write(chunk)
