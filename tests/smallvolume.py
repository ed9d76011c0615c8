"""A small real file system for tests that must fill a volume: a tmpfs mounted for the test only.

Mounting needs root (CI runs as root); elsewhere the test is skipped. The mount is removed however the
test ends, so a failing test never leaves a full file system behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_volume(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=`` syntax) mounted at ``path`` until the block ends."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # busy (a child still exiting): detach


def fill(volume: Path, leave: int) -> Path:
    """Write a filler file until only ``leave`` bytes are free on ``volume``; returns the file."""
    filler = volume / "filler"
    st = os.statvfs(volume)
    free = st.f_bavail * st.f_frsize
    with filler.open("wb") as f:
        f.write(b"\xff" * max(0, free - leave))
    return filler


def free_bytes(volume: Path) -> int:
    st = os.statvfs(volume)
    return st.f_bavail * st.f_frsize
