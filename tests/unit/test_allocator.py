"""The allocator thresholds: a freed transfer buffer stays with the process for the next chunk (no
fresh pages to fault in), and :func:`release_free_memory` hands it back. Each case runs in a new
interpreter, since the settings are process-wide and glibc's defaults are what it is compared with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reconciler.allocator import glibc

PROGRAM = """
import os, sys
from reconciler.allocator import release_free_memory, tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
buffer = b"x" * (8 << 20)  # a chunk-sized buffer, every page touched
del buffer
kept = rss() - base
release_free_memory()
print(kept, rss() - base)
"""


def kept_after_free(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], check=True, capture_output=True, text=True)
    kept, released = out.stdout.split()
    return int(kept), int(released)


@pytest.mark.skipif(glibc() is None, reason="the C library is not glibc")
def test_a_freed_buffer_is_kept_for_the_next_chunk_and_released_after_the_job() -> None:
    kept, released = kept_after_free("tuned")
    assert kept >= 7 << 20  # reused by the next allocation instead of faulted in again
    assert released < 2 << 20  # malloc_trim gave it back
    default_kept, _ = kept_after_free("default")
    assert default_kept < 2 << 20  # glibc's own thresholds unmap it at once: what the tuning changes
