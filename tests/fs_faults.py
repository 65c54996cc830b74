"""Filesystems that refuse writes, for tests of filesystem errors: a read-only or a tiny tmpfs where the test may
mount one; a read-only directory falls back to one without write permission (which root ignores: then skip)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount_tmpfs(path: Path, options: str) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """``path`` as an empty directory nothing can be written into, for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _mount_tmpfs(path, "ro,size=1m")
    if not mounted:
        path.chmod(0o555)
        if os.access(path, os.W_OK):  # root without the right to mount: permissions do not bind it
            path.chmod(0o755)
            pytest.skip("cannot make a read-only directory here (no mount, permissions ignored)")
    try:
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)
        else:
            path.chmod(0o755)


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """``path`` as an empty filesystem of ``size`` (tmpfs syntax: 64k), full after that many bytes."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount_tmpfs(path, f"size={size}"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
