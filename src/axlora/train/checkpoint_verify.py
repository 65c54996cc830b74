"""Is a checkpoint whole? Checked before a resume trusts it.

A save records the size and SHA-256 of every file it wrote in the state file (``files``), which it writes
last. A checkpoint is intact when that state reads, names its ``step``, and every file it lists is there with
the recorded size and hash: a file truncated, emptied, overwritten or lost after the save (a full disk, a
copy cut short, a bad sync) is found before torch or safetensors fail on it with a traceback. Hashing costs a
read of the adapter and optimizer state, seconds next to loading the model. Checkpoints saved before sizes
were recorded get the checks that need no record: the required files present and not empty.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from axlora.core.layout import CHECKPOINT_STATE
from axlora.core.names import ADAPTER_WEIGHTS

FILES_KEY = "files"
"""The state file's record of the checkpoint's other files: ``{name: {"size": bytes, "sha256": hex}}``."""

_REQUIRED = (ADAPTER_WEIGHTS, "scheduler.pt", "rng_state.pt")


def file_record(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file in ``directory`` (a checkpoint being saved), by name."""
    record = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != CHECKPOINT_STATE):
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        record[path.name] = {"size": path.stat().st_size, "sha256": digest}
    return record


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` unfit to resume from, naming the file; None when it is intact."""
    state_file = path / CHECKPOINT_STATE
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{state_file}: missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{state_file}: unreadable ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f'{state_file}: has no "step"'
    record = state.get(FILES_KEY)
    if isinstance(record, dict):
        return _recorded_problem(path, record)
    return _unrecorded_problem(path)


def _recorded_problem(path: Path, record: dict[str, Any]) -> str | None:
    for name, expected in record.items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return f"{file}: missing"
        except OSError as exc:
            return f"{file}: unreadable ({exc.strerror})"
        if size != expected.get("size"):
            return f"{file}: {size} bytes, the save wrote {expected.get('size')} (truncated or overwritten)"
        try:
            with open(file, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as exc:
            return f"{file}: unreadable ({exc.strerror})"
        if digest != expected.get("sha256"):
            return f"{file}: content differs from what the save wrote (SHA-256 mismatch)"
    return None


def _unrecorded_problem(path: Path) -> str | None:
    """A checkpoint without a record of its files: the files every checkpoint has, present and not empty."""
    # the optimizer state is one file, or one per rank where ZeRO partitions it
    optimizer = "rank-0.pt" if (path / "rank-0.pt").exists() and not (path / "optimizer.pt").exists() else "optimizer.pt"
    for name in (*_REQUIRED, optimizer):
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size == 0:
            return f"{file}: empty"
    return None
