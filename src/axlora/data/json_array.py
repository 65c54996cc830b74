"""A JSON array of rows (or a file holding one JSON object) read as a stream, in bounded memory.

One pass decodes the file a chunk at a time and parses it element by element
(``json.JSONDecoder.raw_decode``), keeping only where each element starts and ends in the file (16 bytes a
row); a row is parsed again from those bytes when it is asked for. The pass holds a chunk and the element
being parsed, never the whole text, and reports what ``json.loads`` of the whole text would: the same
message at the same line and column, invalid UTF-8 anywhere in the file first, and a non-object element
only once the whole document has parsed.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from axlora.core.errors import UserError
from axlora.data.row_readers import (
    BOM,
    PROGRESS_ROWS,
    FileHandle,
    Progress,
    Row,
    invalid_utf8,
    line_and_column,
)

CHUNK_BYTES = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as json.loads skips it
_NUMBER_GOES_ON = frozenset("0123456789+-.eE")
"""Characters that may continue a number: an element ending just before one may not have been read whole."""
_TRAILING_COMMA = sys.version_info >= (3, 13)  # json names "[1, ]" itself from 3.13 on


class JsonArrayRows(Sequence):
    """The elements of a JSON array (or the one object of a file), each parsed from its bytes when read."""

    def __init__(self, path: Path, starts: np.ndarray, ends: np.ndarray, line: int | None = None):
        self.path, self.starts, self.ends = path, starts, ends
        self.line = line
        """Line of the object, for a file holding one object (its errors name the line, as before)."""
        self._file = FileHandle(path)

    @classmethod
    def index(cls, path: Path, chunk_bytes: int = CHUNK_BYTES, progress: Progress = None) -> JsonArrayRows:
        starts, ends = array("q"), array("q")
        with open(path, "rb") as handle:
            document = JsonDocument(path, handle, chunk_bytes)
            for _value, start, end in document:
                starts.append(start)
                ends.append(end)
                if progress and len(starts) % PROGRESS_ROWS == 0:
                    progress(len(starts), end)
        line = None if document.is_array else line_and_column(path, starts[0])[0]
        return cls(path, np.frombuffer(starts, np.int64), np.frombuffer(ends, np.int64), line)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Row:
        start, end = int(self.starts[index]), int(self.ends[index])
        value = json.loads(self._file.at(start).read(end - start).decode("utf-8"))
        if not isinstance(value, dict):  # checked when indexed: only a file changed since then gets here
            raise UserError(f"{self.path}: row {index + 1}: expected a JSON object, got {type(value).__name__}.")
        return value

    def line_of(self, index: int) -> int | None:
        """The object's line for a file holding one object; an array's rows are named by number only, as before."""
        return self.line


class JsonDocument:
    """The rows of a JSON document as they are parsed, each ``(value, start byte, end byte)``: the elements of an
    array, or the one value of a file that holds no array. Raises what ``json.loads`` of the whole text would."""

    def __init__(self, path: Path, handle, chunk_bytes: int = CHUNK_BYTES):
        self.path, self.handle, self.chunk_bytes = path, handle, chunk_bytes
        self.is_array: bool | None = None

    def __iter__(self) -> Iterator[tuple[object, int, int]]:
        scan = _Scanner(self.path, self.handle, self.chunk_bytes)
        scan.skip_whitespace()
        self.is_array = scan.peek() == "["
        first_not_object = None
        for number, (value, start, end) in enumerate(_array_elements(scan) if self.is_array else [scan.value()]):
            if not isinstance(value, dict) and first_not_object is None:
                first_not_object = f"{self.path}: row {number + 1}: expected a JSON object, got {type(value).__name__}."
            yield value, start, end
        scan.skip_whitespace()
        if scan.peek():
            raise scan.error("Extra data", scan.i)
        if first_not_object:  # named only once the document parsed, as json.loads of the whole text did
            raise UserError(first_not_object)


def _array_elements(scan: _Scanner) -> Iterator[tuple[object, int, int]]:
    """The elements of the array whose ``[`` is at the scan position, as json's own array scanner reads them."""
    scan.i += 1
    scan.skip_whitespace()
    if scan.peek() == "]":
        scan.i += 1
        return
    while True:
        yield scan.value()
        scan.skip_whitespace()
        following = scan.peek()
        if following == "]":
            scan.i += 1
            return
        if following != ",":
            raise scan.error("Expecting ',' delimiter", scan.i)
        scan.byte_of(scan.i)  # the mark stays on the comma, which a trailing-comma error names
        scan.i += 1
        scan.skip_whitespace()
        if _TRAILING_COMMA and scan.peek() == "]":
            raise scan.error("Illegal trailing comma before end of array", scan.mark)


class _Scanner:
    """Decoded text of a file, a chunk at a time, with the byte offset of a moving mark.

    ``text[mark:]`` is kept (the element being parsed starts at the mark); the text before it is dropped when
    more is read. Byte offsets are counted by encoding the text as the mark passes it, once per character.
    """

    def __init__(self, path: Path, handle, chunk_bytes: int):
        self.path, self.handle, self.chunk_bytes = path, handle, chunk_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.read_to = 3 if handle.read(3) == BOM else handle.seek(0)
        self.text, self.i, self.mark, self.mark_byte = "", 0, 0, self.read_to
        self.eof = False

    def more(self, at_least: int = 0) -> None:
        """Read and decode the next chunk (at least ``at_least`` bytes: an element longer than a chunk is re-parsed
        a logarithmic number of times), dropping the text before the mark."""
        block = self.handle.read(max(self.chunk_bytes, at_least))
        pending = len(self.decoder.getstate()[0])
        try:
            new = self.decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise invalid_utf8(self.path, self.read_to - pending + exc.start) from None
        self.read_to += len(block)
        self.eof = not block
        self.text, self.i = self.text[self.mark:] + new, self.i - self.mark
        self.mark = 0

    def peek(self) -> str:
        """The character at the scan position ('' at the end of the file)."""
        while self.i >= len(self.text) and not self.eof:
            self.more()
        return self.text[self.i] if self.i < len(self.text) else ""

    def skip_whitespace(self) -> None:
        while True:
            self.i = _WHITESPACE.match(self.text, self.i).end()
            if self.i < len(self.text) or self.eof:
                return
            self.more()

    def byte_of(self, index: int) -> int:
        """Byte offset of ``text[index]``, moving the mark there (``index`` >= the mark)."""
        self.mark_byte += len(self.text[self.mark:index].encode("utf-8"))
        self.mark = index
        return self.mark_byte

    def value(self) -> tuple[object, int, int]:
        """The JSON value at the scan position, and the bytes it spans; reads on until it is surely whole."""
        start = self.byte_of(self.i)
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.mark)
                failed = None
            except json.JSONDecodeError as exc:
                failed = exc
            if self.eof or (failed is None and end < len(self.text) and self.text[end] not in _NUMBER_GOES_ON):
                break
            self.more(at_least=len(self.text) - self.mark)
        if failed is not None:
            raise self.error(failed.msg, failed.pos)
        self.i = end
        return value, start, self.byte_of(end)

    def error(self, message: str, index: int) -> UserError:
        """json's error at ``text[index]``; invalid UTF-8 later in the file is named instead, as when the whole
        file was decoded before parsing."""
        position = self.byte_of(index)
        while not self.eof:
            self.mark = len(self.text)
            self.more()
        line, _, chars = line_and_column(self.path, position)
        return UserError(f"{self.path}:{line}: not valid JSON: {message} (column {chars + 1}).")


_DECODER = json.JSONDecoder()
