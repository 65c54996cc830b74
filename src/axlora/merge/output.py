"""The output directory: what may be overwritten, staging in a temporary sibling, and the atomic publish.

A merge writes gigabytes; if it dies half way the user must find either the previous state or a complete
model, never a directory that looks like a model but is not. So everything goes into a hidden sibling directory,
each file is fsync'ed, and only then is the directory renamed into place (a rename within one filesystem is
atomic). Replacing an earlier merge renames it aside first and deletes it only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from axlora.core.errors import UserError
from axlora.core.names import MERGE_MARKER

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "vocab.json", "vocab.txt", "merges.txt",
)
TOKENIZER_GLOBS = ("*.tiktoken",)
TOKENIZER_DIRS = ("additional_chat_templates",)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output_dir(output_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse destinations that would destroy inputs or unrelated data; called before any work and at publish."""
    out = output_dir.expanduser().resolve()
    for what, path in inputs.items():
        resolved = path.expanduser().resolve()
        if out == resolved:
            raise UserError(f"{output_dir}: is the {what} directory; write the merged model to a new directory")
        if _is_within(resolved, out):
            raise UserError(f"{output_dir}: contains the {what} ({path}); replacing it would delete that")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{output_dir}: exists and is not a directory")
    if any(out.iterdir()) and not (out / MERGE_MARKER).is_file():
        raise UserError(f"{output_dir}: exists, is not empty and is not an earlier merge output (no {MERGE_MARKER}); "
                        "choose another output directory or empty it")


def temp_dir_for(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"


@contextmanager
def staging_dir(output_dir: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``output_dir``, removed again if anything (even Ctrl-C) goes wrong."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(output_dir)
    if tmp.exists():  # left by a killed run that had our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, output_dir: Path, inputs: dict[str, Path]) -> None:
    """Move the finished ``tmp`` into place; an earlier merge output there is swapped out, then deleted."""
    fsync_dir(tmp)
    check_output_dir(output_dir, inputs)  # the destination may have changed during a long merge
    old: Path | None = None
    if output_dir.is_dir() and any(output_dir.iterdir()):
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(output_dir, old)
    elif output_dir.is_dir():
        output_dir.rmdir()
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        if old is not None:
            os.rename(old, output_dir)
        raise
    fsync_dir(output_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON and fsync it, so the publish rename never exposes an empty config."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def copy_synced(src: Path, dst: Path) -> None:
    """Copy a file (or a small directory tree) and fsync the copies."""
    if src.is_dir():
        dst.mkdir()
        for child in sorted(src.iterdir()):
            copy_synced(child, dst / child.name)
        return
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def tokenizer_files(directory: Path) -> list[Path]:
    """Tokenizer and chat-template files present in ``directory`` (whatever the tokenizer type wrote)."""
    found = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    for pattern in TOKENIZER_GLOBS:
        found += sorted(directory.glob(pattern))
    found += [directory / n for n in TOKENIZER_DIRS if (directory / n).is_dir()]
    return found


def tokenizer_length(files: list[Path]) -> int | None:
    """``len(tokenizer)`` (added tokens included) from a tokenizer.json among ``files``; None without one."""
    path = next((p for p in files if p.name == "tokenizer.json"), None)
    if path is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library raises plain Exception for unreadable files
        raise UserError(f"{path}: not a readable tokenizer ({e})") from e
