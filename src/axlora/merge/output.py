"""The output directory: what may be replaced, staging in a temporary sibling, and the atomic publish.

A merge writes gigabytes; if it dies half way the user must find either the previous state or a complete
model, never a directory that looks like a model but is not. So everything goes into a hidden sibling directory,
each file is fsync'ed, and only then does ``core.atomic.replace_directory`` put it in place of an earlier merge
without a moment where neither exists.

merge-lora never deletes a file it did not write: its marker (``MERGE_MARKER``) lists every file of the merge,
and an output directory holding anything else (a GGUF export, eval results) is refused, naming those files,
before any work; the user moves them out or picks another ``--output``. A directory without the marker is not
an earlier merge and is replaced only when empty.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from axlora.core.atomic import (
    filesystem_error,
    make_directory,
    recover_directory,
    replace_directory,
    temp_sibling,
)
from axlora.core.errors import UserError
from axlora.core.names import MERGE_MARKER

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "vocab.json", "vocab.txt", "merges.txt",
)
TOKENIZER_GLOBS = ("*.tiktoken",)
TOKENIZER_DIRS = ("additional_chat_templates",)
MARKER_FILES_KEY = "files"
# What merges from before the marker listed its files wrote: their outputs are recognised by these names.
_EARLIER_MERGE_PATTERNS = (
    "model*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json", "*.py",
    MERGE_MARKER, *TOKENIZER_FILES, *TOKENIZER_GLOBS, *TOKENIZER_DIRS,
)


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
    present = sorted(child.name for child in out.iterdir())
    if present and not (out / MERGE_MARKER).is_file():
        raise UserError(f"{output_dir}: exists, is not empty and is not an earlier merge output (no {MERGE_MARKER}); "
                        "choose another output directory or empty it")
    foreign = [name for name in present if not _written_by_merge(name, out / MERGE_MARKER)]
    if foreign:
        raise UserError(f"{output_dir}: holds files merge-lora did not write ({', '.join(foreign)}); replacing the "
                        "earlier merge would delete them: move them out of the directory or choose another --output")


def _written_by_merge(name: str, marker: Path) -> bool:
    """Whether the earlier merge's marker lists ``name`` (by file name pattern for markers without a list)."""
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{marker}: unreadable merge marker ({exc}); move the directory aside or delete it") from None
    listed = data.get(MARKER_FILES_KEY) if isinstance(data, dict) else None
    if isinstance(listed, list):
        return name in listed
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _EARLIER_MERGE_PATTERNS)


def written_files(tmp: Path) -> list[str]:
    """The marker's file list: everything in the staged output, the marker itself included."""
    return sorted({child.name for child in tmp.iterdir()} | {MERGE_MARKER})


@contextmanager
def staging_dir(output_dir: Path, log: Callable[[str], None] = print) -> Iterator[Path]:
    """A fresh temporary sibling of ``output_dir``, removed again if anything (even Ctrl-C) goes wrong.

    A replacement an earlier merge left half done is recovered first; a full, read-only or misplaced disk is
    reported as bad input naming the path.
    """
    make_directory(output_dir.parent)
    recover_directory(output_dir, log)
    tmp = temp_sibling(output_dir)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had our pid
        tmp.mkdir()
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reported = filesystem_error(exc, output_dir) if isinstance(exc, OSError) else None
        if reported is not None:
            raise reported from exc
        raise


def publish(tmp: Path, output_dir: Path, inputs: dict[str, Path]) -> None:
    """Put the finished ``tmp`` in place of ``output_dir`` (an earlier merge there is replaced without a window)."""
    check_output_dir(output_dir, inputs)  # the destination may have changed during a long merge
    replace_directory(tmp, output_dir)


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
