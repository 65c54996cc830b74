"""The header of a safetensors file: every tensor's name, dtype, shape and byte range, without reading tensors.

Both the adapter checks (does this adapter fit that base model?) and the streamed merge start from headers,
so a mismatch is found in a second, before gigabytes are read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from axlora.core.errors import UserError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
DTYPE_SIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                               "U8": 1, "BOOL": 1, "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per element of the safetensors dtypes with whole-byte elements (by their header codes)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file: enough to read it later without reopening the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse a safetensors header only (no tensor data is read); tensors come back in file order.

    Checked as the safetensors library checks it when loading (every entry well formed, byte ranges that match
    dtype and shape, the data exactly as long as the header says), so an unreadable, foreign, truncated or
    damaged file is a ``UserError`` naming it here, not a library error later.
    """
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw_len)
            if not 0 < n <= MAX_HEADER_BYTES:
                raise ValueError(f"header of {n} bytes is outside the 1 byte to 100 MB range")
            raw_header = f.read(n)
            if len(raw_header) != n:
                raise ValueError(f"the file ends inside its {n}-byte header: it is truncated")
            header = json.loads(raw_header)
            file_size = os.fstat(f.fileno()).st_size
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    infos = sorted((_tensor_info(path, name, spec, 8 + n) for name, spec in header.items()), key=lambda i: i.start)
    data_end = max((info.end for info in infos), default=8 + n)
    if data_end > file_size:
        raise UserError(f"{path}: holds {file_size} bytes but its header describes {data_end}: the file is truncated "
                        "(an interrupted save or download?)")
    if data_end < file_size:
        raise UserError(f"{path}: holds {file_size - data_end} bytes more than its header describes: the file is "
                        "damaged")
    return infos, metadata


def _tensor_info(path: Path, name: str, spec: object, data_start: int) -> TensorInfo:
    """One header entry, checked: ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}``."""
    def bad(why: str) -> UserError:
        return UserError(f"{path}: tensor {name!r} has a damaged header entry ({why})")

    if not isinstance(spec, dict):
        raise bad("not a JSON object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad("no dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1])
    if dtype in DTYPE_SIZES and info.nbytes != info.numel * DTYPE_SIZES[dtype]:
        raise bad(f"{info.nbytes} bytes for a {dtype} tensor of shape {list(shape)}")
    return info


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from the header alone."""
    infos, _ = read_header(path)
    return {info.name: info.shape for info in infos}
