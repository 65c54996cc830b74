"""Plain text and CSV files read as a stream: one pass finds where each row starts, a row is read when asked for.

The pass reads a line at a time, so it holds one line (one record for CSV), never the file; what it keeps is
the byte offset of every row (8 bytes a row; CSV also keeps its line numbers). The rows are those the whole
text would give: a text row per ``str.splitlines`` line, a CSV row as ``csv.DictReader`` reads the text with
universal newlines. Errors are today's: invalid UTF-8 anywhere in the file first (named by line and column),
then an empty file, then a CSV error at its line.
"""

from __future__ import annotations

import csv
import re
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from axlora.core.errors import UserError
from axlora.data.row_readers import BOM, PROGRESS_ROWS, FileHandle, Progress, Row, decode_line

_LINE_ENDS = re.compile(r"[^\r\n]*(?:\r\n?|\n)|[^\r\n]+")
"""Lines as ``io.StringIO(newline="")`` iterates them: ended by \\r, \\n or \\r\\n."""


class _Lines:
    """The decoded lines of a binary file from its position on, each with the byte offset where it starts.

    ``offset`` is where the next line starts; ``content`` tells whether any line held more than whitespace.
    """

    def __init__(self, path: Path, handle, number: int = 1):
        self.path, self.handle, self.number = path, handle, number
        if handle.tell() == 0 and handle.read(3) != BOM:  # a BOM is skipped, as decoding with utf-8-sig did
            handle.seek(0)
        self.offset = handle.tell()
        self.content = False

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for line in self.handle:
            text = decode_line(self.path, line, self.number)
            self.number += 1
            self.content = self.content or bool(text.strip())
            start, self.offset = self.offset, self.offset + len(line)
            yield start, text

    def drain(self) -> None:
        """Decode the rest of the file: invalid UTF-8 there is named before any other problem, as it was when
        the whole file was decoded first."""
        for _ in self:
            pass


def _universal_lines(lines: _Lines) -> Iterator[str]:
    """``lines`` split again at a lone \\r, as CSV reads them; ``lines.offset`` is where the next one starts."""
    for start, text in lines:
        first = text.find("\r")
        if first < 0 or first == len(text) - 1 or (first == len(text) - 2 and text[-1] == "\n"):
            yield text  # no \r, or only the one that ends the line
            continue
        end = lines.offset
        lines.offset = start
        for piece in _LINE_ENDS.findall(text):
            lines.offset += len(piece.encode("utf-8"))
            yield piece
        lines.offset = end


class TextLinesRows(Sequence):
    """``{"text": line}`` for every line of a text file (lines as ``str.splitlines`` ends them)."""

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path, self.offsets = path, offsets
        self._file = FileHandle(path)

    @classmethod
    def index(cls, path: Path, progress: Progress = None) -> TextLinesRows:
        offsets = array("q")
        with open(path, "rb") as handle:
            lines = _Lines(path, handle)
            for start, text in lines:
                if progress and len(offsets) % PROGRESS_ROWS == 0:
                    progress(len(offsets), start)
                pieces = text.splitlines(keepends=True)
                if len(pieces) == 1:
                    offsets.append(start)
                    continue
                for piece in pieces:  # other line breaks (\r, \x1c, U+2028, ...) inside one \n line
                    offsets.append(start)
                    start += len(piece.encode("utf-8"))
        if not lines.content:
            raise UserError(f"{path}: the data file is empty.")
        return cls(path, np.frombuffer(offsets, np.int64))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Row:
        line = self._file.at(int(self.offsets[index])).readline().decode("utf-8")
        return {"text": (line.splitlines() or [""])[0]}

    def line_of(self, index: int) -> int:
        return index + 1


class CsvRows(Sequence):
    """The records of a CSV file as ``csv.DictReader`` gives them (every value text), columns it cannot name left out."""

    def __init__(self, path: Path, fieldnames: list[str], offsets: np.ndarray, lines: np.ndarray):
        self.path, self.fieldnames, self.offsets, self.lines = path, fieldnames, offsets, lines
        self._file = FileHandle(path)

    @classmethod
    def index(cls, path: Path, progress: Progress = None) -> CsvRows:
        offsets, numbers = array("q"), array("q")
        with open(path, "rb") as handle:
            lines = _Lines(path, handle)
            reader = csv.DictReader(_universal_lines(lines))
            try:
                fieldnames = reader.fieldnames or []
                number = 2
                while True:
                    start = lines.offset
                    if next(reader, None) is None:
                        break
                    offsets.append(start)
                    numbers.append(number)
                    if progress and len(offsets) % PROGRESS_ROWS == 0:
                        progress(len(offsets), lines.offset)
                    number = reader.line_num + 1
            except csv.Error as exc:
                lines.drain()
                raise UserError(f"{path}:{reader.line_num}: not valid CSV: {exc}.") from None
        if not lines.content:
            raise UserError(f"{path}: the data file is empty.")
        return cls(path, fieldnames, np.frombuffer(offsets, np.int64), np.frombuffer(numbers, np.int64))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Row:
        lines = _Lines(self.path, self._file.at(int(self.offsets[index])))
        row = next(csv.DictReader(_universal_lines(lines), fieldnames=self.fieldnames))
        return {key: value for key, value in row.items() if key is not None}

    def line_of(self, index: int) -> int:
        return int(self.lines[index])
