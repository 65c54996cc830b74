"""A write under ``output_dir`` that the disk refused, at any stage of a run, as one line naming path and reason.

Python's own file calls raise ``OSError`` with the path; torch and safetensors wrap the same failure in their
own exception types with the OS error in the text ("file write failed", "IoError(Os { code: 28, ... })"). Both
become ``UserError`` (exit status 2) when the cause is the disk's or the path's: no space, read-only, no
permission, a file where a directory should be. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from axlora.core.atomic import filesystem_error
from axlora.core.errors import UserError

_OS_CODE = re.compile(r"\bcode: (\d+)\b|\[Errno (\d+)\]")
_WRITE_FAILED = ("file write failed", "failed writing file", "No space left on device")
_NEARLY_FULL = 1 << 20  # bytes: a disk with less free space than this is what stopped a write


@contextmanager
def reported_write_errors(output_dir: Path) -> Iterator[None]:
    """Report a refused write under ``output_dir`` as bad input (see the module's docstring)."""
    try:
        yield
    except UserError:
        raise
    except OSError as exc:
        raise (filesystem_error(exc, output_dir) or exc) from None
    except Exception as exc:
        error = _library_write_error(exc, output_dir)
        if error is None:
            raise
        raise error from None


def _library_write_error(exc: Exception, output_dir: Path) -> UserError | None:
    """A torch or safetensors exception that wraps a refused write, as the ``OSError`` it stands for."""
    text = str(exc)
    found = _OS_CODE.search(text)
    code = int(found.group(1) or found.group(2)) if found else None
    if code is None and any(marker in text for marker in _WRITE_FAILED):
        code = _disk_state(output_dir)
    if code is None:
        return None
    return filesystem_error(OSError(code, os.strerror(code), str(output_dir)), output_dir)


def _disk_state(output_dir: Path) -> int | None:
    """Why a library's write under ``output_dir`` failed, read from the disk itself."""
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is None:
        return None
    if shutil.disk_usage(existing).free < _NEARLY_FULL:
        return errno.ENOSPC
    if not os.access(existing, os.W_OK):
        return errno.EACCES
    return None
