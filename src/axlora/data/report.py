"""What preparing the data did: counts per dataset, tokens, lengths, packing fill; as JSON, text and a plot.

The report is computed once, when the data is prepared, and saved beside the cached rows
(``report.json``, ``lengths.png``); a cache hit prints the same summary without recomputing anything.
Packing is always measured (it is cheap and depends only on the lengths and ``sequence_len``), so the
report does not change when only ``sample_packing`` does.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from pathlib import Path
from typing import Any

import numpy as np

from axlora.data.pack import pack_sequences
from axlora.data.rows import TokenizedRows

PERCENTILES = (50, 90, 95, 99)
HISTOGRAM = "lengths.png"


def length_summary(lengths: np.ndarray) -> dict[str, float | int]:
    """min, mean, percentiles and max of sample lengths (empty: zeros)."""
    if len(lengths) == 0:
        return {"min": 0, "mean": 0.0, **{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    return {
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 1),
        **{f"p{p}": int(np.percentile(lengths, p, method="closest_observation")) for p in PERCENTILES},
        "max": int(lengths.max()),
    }


def packing_summary(lengths: np.ndarray, capacity: int) -> dict[str, Any]:
    """How ``sample_packing`` would pack these samples into rows of ``capacity`` tokens."""
    if len(lengths) == 0:
        return {"rows": 0, "samples": 0, "tokens": 0, "capacity": capacity, "fill": 0.0}
    rows, tokens = packed_row_count(lengths, capacity), int(lengths.sum())
    return {"rows": rows, "samples": len(lengths), "tokens": tokens, "capacity": capacity,
            "fill": round(tokens / (rows * capacity), 4)}


def packed_row_count(lengths: np.ndarray, capacity: int) -> int:
    """How many rows ``pack.pack_sequences`` fills with samples of ``lengths``, without building the rows.

    Best-fit decreasing only ever asks how much room the open rows have, so it is replayed on a count of open
    rows per room value (at most ``capacity`` of them), a run of equal samples at a time where the rows they
    go to cannot take another: memory stays the same whatever the number of samples.
    """
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        pack_sequences(lengths.tolist(), capacity)  # raises its error naming the sample
    sizes, counts = np.unique(lengths, return_counts=True)
    rooms: list[int] = []  # the distinct rooms of open rows, sorted
    open_rows: dict[int, int] = {}  # room -> how many open rows have it
    rows = 0
    for size, count in zip(sizes[::-1].tolist(), counts[::-1].tolist(), strict=True):
        while count:
            k = bisect_left(rooms, size)
            if k == len(rooms):  # nothing fits: new rows
                room = capacity
                taken = count if capacity - size < size else 1
                rows += taken
            else:  # the tightest rows that fit
                room = rooms[k]
                taken = min(count, open_rows[room]) if room - size < size else 1
                open_rows[room] -= taken
                if not open_rows[room]:
                    del open_rows[room], rooms[k]
            count -= taken
            if room - size > 0:
                if room - size not in open_rows:
                    insort(rooms, room - size)
                open_rows[room - size] = open_rows.get(room - size, 0) + taken
    return rows


def split_summary(rows: TokenizedRows) -> dict[str, Any]:
    return {
        "rows": len(rows),
        "tokens": int(rows.lengths.sum()),
        "label_tokens": int(rows.scored_counts().sum()),
    }


def format_summary(report: dict[str, Any], sample_packing: bool) -> list[str]:
    """The report as a few readable lines."""
    lines = ["datasets:"]
    for number, entry in enumerate(report["datasets"], start=1):
        taken = f", {entry['rows_taken']:,} taken" if entry["rows_taken"] != entry["rows_read"] else ""
        extra = f"; split {entry['split_long']:,} long ones into pieces" if entry.get("split_long") else ""
        if entry.get("empty_turns"):
            extra += f"; {entry['empty_turns']:,} empty turns not trained"
        lines.append(
            f"  {number}. {entry['path']} (type {entry['type']}, split {entry['split']}): {entry['rows_read']:,} "
            f"read{taken} -> {entry['train_rows']:,} train + {entry['val_rows']:,} val; dropped "
            f"{entry['dropped_too_long']:,} too long, {entry['dropped_no_labels']:,} with nothing to train; "
            f"truncated {entry['truncated']:,}{extra}"
        )
    train, val = report["train"], report["val"]
    share = 100 * train["label_tokens"] / max(train["tokens"], 1)
    lines.append(
        f"train: {train['rows']:,} rows, {train['tokens']:,} tokens, {train['label_tokens']:,} trained ({share:.1f}%)"
    )
    if val["rows"]:
        lines.append(f"val:   {val['rows']:,} rows, {val['tokens']:,} tokens, {val['label_tokens']:,} trained")
    lengths = report["lengths"]
    lines.append(
        f"lengths as tokenized: min {lengths['min']}, median {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, "
        f"max {lengths['max']} (sequence_len {report['sequence_len']}, over it: {report['excess_length_strategy']})"
    )
    packing = report["packing"]
    state = "on" if sample_packing else "off; if on"
    lines.append(
        f"packing ({state}): {packing['samples']:,} samples -> {packing['rows']:,} rows of {packing['capacity']} "
        f"tokens, fill {100 * packing['fill']:.1f}%"
    )
    return lines


def write_histogram(lengths: np.ndarray, sequence_len: int, path: Path) -> None:
    """A histogram (PNG) of sample lengths before the length rule, with ``sequence_len`` marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(lengths):
        low, high = int(lengths.min()), int(lengths.max())
        edges = np.arange(low, high + 2) - 0.5 if high - low < 60 else np.linspace(low, high, 61)
        counts, edges = np.histogram(lengths, bins=edges)
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8)
    ax.axvline(sequence_len, color="tab:red", linestyle="--", label=f"sequence_len {sequence_len}")
    ax.set_xlabel("tokens per sample, as tokenized (train + val)")
    ax.set_ylabel("samples")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
