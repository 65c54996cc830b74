"""Rows of a data file by position, without holding the file's rows in memory.

Preparing shuffles rows before tokenizing them, so it reads rows in random order. A JSON Lines file is
indexed once (the byte offset of every row: 8 bytes a row) and each row is parsed when asked for; an Arrow
file is memory-mapped and a row is converted when asked for. Forked tokenizer workers inherit the index
and open their own file handle (``FileHandle``). The other text formats are indexed the same way, each by
its own module: a JSON array or object (``json_array.py``), CSV and plain text (``line_rows.py``); Parquet
is decoded a batch at a time into a memory-mapped Arrow spool (``sources.py``).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from axlora.core.errors import UserError

Row = dict[str, Any]
BOM = b"\xef\xbb\xbf"
Progress = Callable[[int, int], None] | None
"""Told (rows found, bytes read) every ``PROGRESS_ROWS`` rows of a reading pass."""
PROGRESS_ROWS = 1 << 14


class JsonLinesRows(Sequence):
    """The rows of a JSON Lines file, parsed one at a time from byte offsets found by one pass over the file.

    The pass decodes every line (invalid UTF-8 is named by line and column, as when the whole text is read)
    and checks the others are JSON objects (every bad line is named, in file order); blank lines are skipped.
    """

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path, self.offsets = path, offsets
        self._file = FileHandle(path)

    @classmethod
    def index(cls, path: Path, progress: Progress = None) -> JsonLinesRows:
        offsets, problems, position = array("q"), [], 0  # 8 bytes a row, not a Python int each
        decode = json.JSONDecoder().decode
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                text = decode_line(path, line[3:] if number == 1 and line.startswith(BOM) else line, number)
                if text.strip():
                    offsets.append(position)
                    if progress and len(offsets) % PROGRESS_ROWS == 0:
                        progress(len(offsets), position)
                    problem = _line_problem(decode, text.removesuffix("\n"))
                    if problem:
                        problems.append(f"{path}:{number}: {problem}")
                position += len(line)
        if not offsets:
            raise UserError(f"{path}: the data file is empty.")
        if problems:
            raise UserError(problem_list(problems, "lines"))
        return cls(path, np.frombuffer(offsets, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Row:
        handle = self._file.at(int(self.offsets[index]))
        value = json.loads(handle.readline().decode("utf-8").removeprefix("\ufeff"))
        if not isinstance(value, dict):  # checked when indexed: only a file changed since then gets here
            raise UserError(f"{self.path}:{self.line_of(index)}: expected a JSON object per line.")
        return value

    def line_of(self, index: int) -> int:
        """Line number (from 1) of row ``index``: counted only when an error names it."""
        with open(self.path, "rb") as handle:
            return handle.read(int(self.offsets[index])).count(b"\n") + 1



class FileHandle:
    """This process's binary handle on ``path``: a forked worker opens its own, never moving the parent's position."""

    def __init__(self, path: Path):
        self.path = path
        self._handle, self._pid = None, None

    def at(self, offset: int):
        """The handle, positioned at byte ``offset``."""
        if self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - lives with the reader
        self._handle.seek(offset)
        return self._handle

    def __getstate__(self):
        return {"path": self.path, "_handle": None, "_pid": None}


def _line_problem(decode, text: str) -> str | None:
    """What is wrong with one JSON Lines line, or None."""
    try:
        value = decode(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} (column {exc.colno})."
    if not isinstance(value, dict):
        return f"expected a JSON object per line, got {type(value).__name__}."
    return None


def problem_list(problems: list[str], what: str, shown: int = 5) -> str:
    """One problem as it is; several as a count and the first ``shown``, in file order."""
    if len(problems) == 1:
        return problems[0]
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} {what} cannot be used (the first {min(shown, len(problems))}, in file order):\n  " + (
        "\n  ".join(problems[:shown]) + more
    )


def decode_line(path: Path, line: bytes, number: int) -> str:
    """One line of a data file as text; invalid UTF-8 is named by line, column and byte."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}:{number}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8."
        ) from None


def line_and_column(path: Path, position: int) -> tuple[int, int, int]:
    """(line, byte column, chars before ``position`` on its line) of byte ``position``, read from the file's start.

    Only errors need these, so the file is read again rather than counted on the way. Columns of line 1 start
    after a BOM, as the text a reader sees does.
    """
    line, line_start, done = 1, 0, 0
    with open(path, "rb") as handle:
        while done < position:
            block = handle.read(min(1 << 20, position - done))
            if not block:
                break
            if b"\n" in block:
                line += block.count(b"\n")
                line_start = done + block.rfind(b"\n") + 1
            done += len(block)
        if line == 1 and handle.seek(0) == 0 and handle.read(3) == BOM:
            line_start = 3
        handle.seek(line_start)
        head = handle.read(max(position - line_start, 0))
    return line, position - line_start + 1, len(head.decode("utf-8", errors="replace"))


def invalid_utf8(path: Path, position: int) -> UserError:
    """The error for the invalid byte at ``position``, named as ``decode_line`` names it."""
    line, column, _ = line_and_column(path, position)
    with open(path, "rb") as handle:
        handle.seek(position)
        byte = handle.read(1)[0]
    return UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at column {column}); save the file as UTF-8.")


class ArrowRows(Sequence):
    """The rows of an Arrow table (a memory-mapped file, or a ``datasets`` table), converted when read."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> Row:
        return self.table.slice(int(index), 1).to_pylist()[0]


class ConcatRows(Sequence):
    """Several files' rows as one sequence, in order."""

    def __init__(self, parts: Sequence[Sequence[Row]]):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def part_of(self, position: int) -> tuple[int, int]:
        """(file index, row index in that file) of ``position``."""
        k = int(np.searchsorted(self.starts, position, side="right")) - 1
        return k, position - int(self.starts[k])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, position: int) -> Row:
        k, local = self.part_of(int(position))
        return self.parts[k][local]


class RowsView(Sequence):
    """The rows of ``rows`` at ``positions``, read when asked for; compares equal to a list of the same rows."""

    def __init__(self, rows: Sequence[Row], positions: np.ndarray):
        self.rows, self.positions = rows, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.rows[int(p)] for p in self.positions[index]]
        return self.rows[int(self.positions[index])]

    def __iter__(self) -> Iterator[Row]:
        for position in self.positions:
            yield self.rows[int(position)]

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, RowsView)) and list(self) == list(other)

    __hash__ = None
