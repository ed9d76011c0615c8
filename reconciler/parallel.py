"""Work run on a few threads with its results kept in order: the shape of every disk transfer.

Disk reads from a host (:mod:`reconciler.esxi.transport`) and chunk decoding for restores and exports
(:mod:`reconciler.operations.restore`) both fetch pieces on several threads and consume them in disk
order. Here, below every other layer, so an export (which talks to no host) does not load the SSH and
HTTPS libraries just for this (0.2 s of its start).
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Iterable, Iterator


def ordered_parallel(
    work: Iterable[tuple[int, int]],
    fetch: Callable[[int, int], bytes],
    streams: int,
    *,
    window: int | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Run ``fetch(offset, length)`` on ``streams`` threads, yield ``(offset, result)`` in input order,
    keep at most ``window`` (default ``2 × streams``) pieces pending: a wider window lets the threads
    run ahead of a slow piece at the head, at the cost of memory. The first failure is raised as it
    was when its piece's turn comes; pieces not started by then are cancelled."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=streams, thread_name_prefix="disk-read") as pool:
        pending: deque[tuple[int, concurrent.futures.Future[bytes]]] = deque()
        it = iter(work)
        try:
            for off, length in it:
                pending.append((off, pool.submit(fetch, off, length)))
                if len(pending) >= (window or 2 * streams):
                    off0, fut = pending.popleft()
                    yield off0, fut.result()
            while pending:
                off0, fut = pending.popleft()
                yield off0, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()
