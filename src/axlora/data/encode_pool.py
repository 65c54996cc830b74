"""Tokenize rows in chunks, in several processes when the data is large (``dataset_processes``).

Formatting a row (string templates, chat-template rendering) and assembling labels is Python work that
one core does; the fast tokenizer's own threads only speed up the tokenizer call. So large datasets are
cut into chunks that forked worker processes prepare side by side, a few chunks ahead of the caller,
which writes each one away as it arrives. The rows reach the workers by
``fork`` (inherited memory, nothing pickled); only the chunk bounds go out and numpy arrays come back.

Each worker tokenizes with the tokenizer's threads off (``TOKENIZERS_PARALLELISM=false``): N processes
already keep N cores busy, and ``tokenizers`` would otherwise warn that it was forked after using threads.
Where ``fork`` is unavailable (macOS, Windows) or the data is small, chunks are prepared in this process.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from axlora.data.rows import TokenizedRows
from axlora.data.segments import RowFormat
from axlora.data.tokenize import Entry, encode_rows

CHUNK_ROWS = 4096
MIN_ROWS_PER_PROCESS = 8192

_job: tuple | None = None
"""The job a forked worker inherits (set in the worker by ``_start``; never in the parent)."""


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encode_in_chunks(
    entries: Sequence[Entry],
    formats: Sequence[RowFormat],
    tokenizer,
    *,
    train_on_inputs: bool,
    processes: int | None,
    char_limits: Sequence[int | None] | None = None,
) -> TokenizedRows:
    """``encode_rows`` over all ``entries``, in order, as one ``TokenizedRows`` (small data, tests)."""
    return TokenizedRows.concat(list(encode_chunks(
        entries, formats, tokenizer, train_on_inputs=train_on_inputs, processes=processes, char_limits=char_limits,
    )))


def encode_chunks(
    entries: Sequence[Entry],
    formats: Sequence[RowFormat],
    tokenizer,
    *,
    train_on_inputs: bool,
    processes: int | None,
    char_limits: Sequence[int | None] | None = None,
    then: Callable[[TokenizedRows], Any] | None = None,
) -> Iterator[Any]:
    """``encode_rows`` of ``CHUNK_ROWS`` entries at a time, in order, as each chunk is ready.

    The caller writes each chunk away before the next, so the tokens of the whole data never sit in memory.
    ``then`` (run in the worker that tokenized the chunk) turns each chunk into what is yielded instead.
    ``processes`` None: the CPUs available.
    """
    bounds = [(start, min(start + CHUNK_ROWS, len(entries))) for start in range(0, len(entries), CHUNK_ROWS)]
    wanted = min(processes or available_cpus(), len(entries) // MIN_ROWS_PER_PROCESS)
    if wanted <= 1 or "fork" not in multiprocessing.get_all_start_methods() or sys.platform != "linux":
        for a, b in bounds:
            rows = encode_rows(entries[a:b], formats, tokenizer, train_on_inputs=train_on_inputs, char_limits=char_limits)
            yield then(rows) if then else rows
        return
    context = multiprocessing.get_context("fork")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the children at fork time
    # Objects that exist now are never collected in the children: the collector would touch (and so copy)
    # every page of the inherited rows, which fork otherwise shares.
    gc.freeze()
    try:
        job = (entries, formats, tokenizer, train_on_inputs, char_limits, then)
        with context.Pool(wanted, initializer=_start, initargs=(job,)) as pool:
            yield from _bounded_imap(pool, bounds, ahead=2 * wanted)
    finally:
        gc.unfreeze()
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _bounded_imap(pool, bounds: Sequence[tuple[int, int]], ahead: int) -> Iterator[TokenizedRows]:
    """Chunk results in order with at most ``ahead`` chunks submitted and not yet taken (memory stays bounded)."""
    pending: deque = deque()
    for chunk in bounds:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _start(job: tuple) -> None:
    global _job
    _job = job


def _encode_chunk(bounds: tuple[int, int]) -> Any:
    entries, formats, tokenizer, train_on_inputs, char_limits, then = _job
    start, stop = bounds
    rows = encode_rows(entries[start:stop], formats, tokenizer, train_on_inputs=train_on_inputs, char_limits=char_limits)
    return then(rows) if then else rows
