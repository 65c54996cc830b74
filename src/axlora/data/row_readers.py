"""Rows of a data file by position, without holding the file's rows in memory.

Preparing shuffles rows before tokenizing them, so it reads rows in random order. A JSON Lines file is
indexed once (the byte offset of every row: 8 bytes a row) and each row is parsed when asked for; an Arrow
file is memory-mapped and a row is converted when asked for. Forked tokenizer workers inherit the index
and open their own file handle. Other files (a JSON array or object, CSV, text, Parquet) are read whole as
before, as lists of rows.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from axlora.core.errors import UserError

Row = dict[str, Any]


class JsonLinesRows(Sequence):
    """The rows of a JSON Lines file, parsed one at a time from byte offsets found by one pass over the file.

    The pass decodes every line (invalid UTF-8 is named by line and column, as when the whole text is read)
    and checks the others are JSON objects (every bad line is named, in file order); blank lines are skipped.
    """

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path, self.offsets = path, offsets
        self._handle, self._pid = None, None

    @classmethod
    def index(cls, path: Path) -> JsonLinesRows:
        offsets, problems, position = array("q"), [], 0  # 8 bytes a row, not a Python int each
        decode = json.JSONDecoder().decode
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                text = _decoded(path, line[3:] if number == 1 and line.startswith(b"\xef\xbb\xbf") else line, number)
                if text.strip():
                    offsets.append(position)
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
        if self._pid != os.getpid():  # a forked worker: its own handle, never the parent's file position
            self._handle, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - lives with the reader
        self._handle.seek(int(self.offsets[index]))
        value = json.loads(self._handle.readline().decode("utf-8").removeprefix("\ufeff"))
        if not isinstance(value, dict):  # checked when indexed: only a file changed since then gets here
            raise UserError(f"{self.path}:{self.line_of(index)}: expected a JSON object per line.")
        return value

    def line_of(self, index: int) -> int:
        """Line number (from 1) of row ``index``: counted only when an error names it."""
        with open(self.path, "rb") as handle:
            return handle.read(int(self.offsets[index])).count(b"\n") + 1

    def __getstate__(self):
        return {"path": self.path, "offsets": self.offsets, "_handle": None, "_pid": None}


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


def _decoded(path: Path, line: bytes, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}:{number}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8."
        ) from None


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
