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

    An unreadable, foreign or truncated file is a ``UserError`` naming it.
    """
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw_len)
            if not 0 < n <= MAX_HEADER_BYTES:
                raise ValueError(f"header of {n} bytes is outside the 1 byte to 100 MB range")
            header = json.loads(f.read(n))
            file_size = os.fstat(f.fileno()).st_size
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    infos = []
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        info = TensorInfo(name, spec["dtype"], tuple(spec["shape"]), path, 8 + n + begin, 8 + n + end)
        if info.end > file_size:
            raise UserError(f"{path}: tensor {name!r} ends past the end of the file (truncated download?)")
        infos.append(info)
    infos.sort(key=lambda i: i.start)
    return infos, metadata


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from the header alone."""
    infos, _ = read_header(path)
    return {info.name: info.shape for info in infos}
