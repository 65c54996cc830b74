"""The prepared-data cache: a directory per fingerprint, written atomically, trusted only when complete.

The fingerprint covers the bytes of every local data file, the tokenizer, each dataset entry's settings,
what its format resolved to (the chat template text), and every setting that changes the rows
(``sequence_len``, ``excess_length_strategy``, ``train_on_inputs``, ``val_set_size``, ``seed``). Change any
of them and the data is prepared again; change anything else (learning rate, packing, batch size) and
the cache is used as it is. Hub datasets are keyed by name, ``split``, ``name`` and ``revision``: pin
``revision`` to notice a new upload.

Layout of ``<dataset_prepared_path>/<fingerprint>/``: ``train.arrow``, ``val.arrow`` (see ``rows.py``),
``report.json`` and ``lengths.png``. The Arrow files are written a chunk at a time as the rows are made and
read back memory-mapped. The directory is built as a temporary sibling and renamed into place
(``axlora.core.atomic``), so a killed run leaves either nothing or a complete entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.atomic import atomic_directory
from axlora.core.layout import RunLayout
from axlora.data.rows import MappedRows
from axlora.data.segments import RowFormat

CACHE_FORMAT_VERSION = "2"
REPORT = "report.json"


def data_fingerprint(
    config: Config, tokenizer_fingerprint: str, formats: Sequence[RowFormat], files: Sequence[Sequence[Path]]
) -> str:
    """Hash of everything the prepared rows depend on (``files``: each dataset's local files, in order)."""
    digest = hashlib.sha256()
    settings = {
        "version": CACHE_FORMAT_VERSION,
        "datasets": [d.model_dump() for d in config.datasets],
        "formats": [f.settings for f in formats],
        "sequence_len": config.sequence_len,
        "excess_length_strategy": config.excess_length_strategy,
        "train_on_inputs": config.train_on_inputs,
        "val_set_size": config.val_set_size,
        "seed": config.seed,
        "dataset_exact_deduplication": config.dataset_exact_deduplication,
        "tokenizer": tokenizer_fingerprint,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for dataset_files in files:
        for path in dataset_files:
            digest.update(f"\0{path.name}\0".encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def cache_root(config: Config) -> Path:
    return Path(config.dataset_prepared_path or RunLayout(Path(config.output_dir)).prepared)


def is_complete(cache_dir: Path) -> bool:
    return (cache_dir / REPORT).is_file()


@contextmanager
def new_entry(cache_dir: Path) -> Iterator[Path]:
    """A temporary directory that becomes ``cache_dir`` when the block completes; an existing entry is kept."""
    with atomic_directory(cache_dir, replace=False) as tmp:
        yield tmp


def finish_entry(tmp: Path, report: dict[str, Any], plot) -> None:
    """Write the histogram (``plot(path)``) and, last, the report that marks the entry complete."""
    plot(tmp / "lengths.png")
    (tmp / REPORT).write_text(json.dumps(report, indent=2))


def read_entry(cache_dir: Path) -> tuple[MappedRows, MappedRows, dict[str, Any]]:
    report = json.loads((cache_dir / REPORT).read_text())
    return MappedRows(cache_dir / "train.arrow"), MappedRows(cache_dir / "val.arrow"), report
