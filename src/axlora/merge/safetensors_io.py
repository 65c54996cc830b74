"""Streaming reads and writes of safetensors files, one tensor at a time.

``safetensors.safe_open`` memory-maps the whole file, and every page it touches stays in the process's
resident set until the file is closed: reading a 5 GB shard tensor by tensor grows RSS by 5 GB (measured with
safetensors 0.8: a 1 GB file read through ``safe_open`` raised RSS by 1 GB). A merge that must stay far below the
memory of loading the model therefore reads each tensor's bytes with plain ``read`` calls into a buffer it owns,
and writes output shards by emitting the header first (all names, dtypes and shapes are known from the plan) and
then each tensor's bytes in order, so no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from axlora.core.errors import UserError
from axlora.core.safetensors_header import DTYPE_SIZES, TensorInfo

# safetensors dtype codes this module can turn into torch tensors (others are copied as raw bytes only).
CODE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_CODE: dict[torch.dtype, str] = {v: k for k, v in CODE_TO_TORCH.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
ITEM_SIZE = DTYPE_SIZES  # one table, defined with the header reader

_COPY_CHUNK = 16 * 1024 * 1024  # raw copies move at most this much through memory at once


class TensorReader:
    """Reads tensors from one open safetensors file into freshly allocated, process-owned memory."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()/__exit__
        self._chunk: bytearray | None = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Materialize one tensor (and only it): its bytes are read straight into the tensor's storage."""
        torch_dtype = CODE_TO_TORCH.get(info.dtype)
        if torch_dtype is None:
            raise UserError(f"{info.path}: tensor {info.name!r} has dtype {info.dtype}, which merge cannot compute with")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._read_into(info.start, memoryview(buf.numpy()))
        return buf.view(torch_dtype).reshape(info.shape)

    def copy_raw(self, info: TensorInfo, sink: ShardWriter, name: str) -> None:
        """Copy a tensor's bytes unchanged (as ``name``) in bounded chunks: pass-through tensors never exist as tensors."""
        if self._chunk is None:
            self._chunk = bytearray(_COPY_CHUNK)
        chunk = self._chunk
        view = memoryview(chunk)
        sink.begin(name)
        done = 0
        while done < info.nbytes:
            n = min(len(chunk), info.nbytes - done)
            self._read_into(info.start + done, view[:n])
            sink.write_bytes(view[:n])
            done += n
        sink.end(name)

    def _read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``offset``; loops because one read() call returns at most ~2 GB on Linux."""
        self._file.seek(offset)
        got = 0
        while got < len(view):
            n = self._file.readinto(view[got:])
            if not n:
                raise UserError(f"{self.path}: file ends early (truncated?)")
            got += n


def same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether two stored tensors hold identical bytes, compared in bounded chunks (never whole tensors)."""
    if a.nbytes != b.nbytes:
        return False
    with TensorReader(a.path) as ra, TensorReader(b.path) as rb:
        size = min(_COPY_CHUNK, a.nbytes)
        buf_a, buf_b = bytearray(size), bytearray(size)
        done = 0
        while done < a.nbytes:
            n = min(size, a.nbytes - done)
            ra._read_into(a.start + done, memoryview(buf_a)[:n])
            rb._read_into(b.start + done, memoryview(buf_b)[:n])
            if memoryview(buf_a)[:n] != memoryview(buf_b)[:n]:
                return False
            done += n
    return True


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor an output shard will hold: header fields known before any data is written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEM_SIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; tensors must then arrive in that order.

    Writing the header first is what lets a shard of any size be produced with one tensor in memory at a time.
    The file is flushed and fsync'ed on close so a later rename publishes only complete data.
    """

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self._order = [t.name for t in tensors]
        self._sizes = {t.name: t.nbytes for t in tensors}
        self._next = 0
        self._current: str | None = None
        self._written = 0
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def begin(self, name: str) -> None:
        """Start the next tensor; refuses anything out of header order, which would corrupt the file."""
        if self._current is not None or self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"{self.path}: wrote {name!r} but the header expects {expected!r} next")
        self._current, self._written = name, 0

    def write_bytes(self, data: memoryview | bytes) -> None:
        self._file.write(data)
        self._written += len(data)

    def end(self, name: str) -> None:
        if self._current != name or self._written != self._sizes[name]:
            raise RuntimeError(f"{self.path}: {name!r} got {self._written} bytes, header says {self._sizes[name]}")
        self._current = None
        self._next += 1

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor, whose dtype and shape must match what the header promised."""
        self.begin(name)
        flat = tensor.contiguous().reshape(-1)
        if flat.numel():
            self.write_bytes(memoryview(flat.view(torch.uint8).numpy()))
        self.end(name)

    def close(self) -> None:
        """Finish the file; raises if a planned tensor is missing, since the header would then lie."""
        if self._next != len(self._order):
            self._file.close()
            raise RuntimeError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close without checks (the caller is failing and will delete the file)."""
        self._file.close()


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = []
    size = 0
    for t in tensors:
        if not shards or (size + t.nbytes > max_shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards
