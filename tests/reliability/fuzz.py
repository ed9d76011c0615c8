"""What the fuzz targets share: the real corpus as seeds, mutations of it, a per-call time bound, and the
size of a run (bounded in CI, long with ``RELIABILITY_LONG=1``).

A target passes when every input gives a result or one of the parser's documented exceptions; any other
exception is a crash, and a call that outlives :data:`CALL_SECONDS` is a hang (interrupted by a timer, so a
runaway regular expression cannot stall the suite).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from tests.reliability.ledger import long_runs

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"

CALL_SECONDS = 2.0
"""Longest a parser may take for one input of at most :data:`MAX_INPUT` characters (they take
milliseconds; the bound is loose because CI machines are shared)."""
MAX_INPUT = 64 * 1024

EXAMPLES_CI = 300
EXAMPLES_LONG = 5_000


def run_settings() -> settings:
    """Bounded and reproducible in CI (the same inputs every run); long and random with
    ``RELIABILITY_LONG=1``. No hypothesis deadline: :func:`bounded` is the time bound, and it also stops
    a call that never returns."""
    if long_runs():
        return settings(
            max_examples=EXAMPLES_LONG,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )
    return settings(
        max_examples=EXAMPLES_CI,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )


class Hang(AssertionError):
    """A parser call ran past :data:`CALL_SECONDS`."""


@contextlib.contextmanager
def bounded(what: str, seconds: float = CALL_SECONDS) -> Iterator[None]:
    """Fail with :class:`Hang` if the block runs longer than ``seconds`` (SIGALRM; the main thread only —
    the regular expression engine checks for signals, so a backtracking match is interrupted too)."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"{what} ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Target:
    """One parser under fuzz: ``call`` must return or raise one of ``allowed``."""

    name: str
    call: Callable[[Any], object]
    allowed: tuple[type[BaseException], ...]
    runs: int = 0

    def __call__(self, data: Any) -> None:
        self.runs += 1
        try:
            with bounded(self.name):
                self.call(data)
        except self.allowed:
            pass


def corpus(*kinds: str) -> list[str]:
    """The texts of the real samples of these kinds (``tests/fixtures/real/index.yaml``)."""
    samples = yaml.safe_load((REAL / "index.yaml").read_text(encoding="utf-8"))["samples"]
    texts = [(REAL / s["file"]).read_text(encoding="utf-8") for s in samples if s["kind"] in kinds]
    if not texts:
        raise ValueError(f"no real samples of kind {kinds}")
    return texts


# Fragments that mean something to one of the parsers (quotes, escapes, separators, fault and row shapes,
# huge numbers), so that mutations reach past the first check.
TOKENS = (
    '"',
    "'",
    "|",
    "|2",
    "|22",
    "|ZZ",
    "=",
    " = ",
    "\n",
    "\r\n",
    "\x00",
    "\u2028",
    "\x85",
    "\udce9",
    "#",
    "[",
    "]",
    "] ",
    "[ds] ",
    ".vmx",
    "vmx-14",
    "--",
    "|-ROOT",
    "--Snapshot Id        : ",
    "--Snapshot Name        : ",
    "(vim.fault.NotFound) {",
    'msg = "',
    "Power on failed",
    "vmodl key: ",
    "RW ",
    " VMFS ",
    "9" * 5000,
    "-1",
    "ffffffff",
    "Vmid  Name      File     Guest OS   Version  Annotation\n",
    "\t",
    " " * 200,
)


def _apply(text: str, edits: list[tuple[int, int, int, str]]) -> str:
    for kind, a, b, insert in edits:
        n = len(text)
        i, j = (a % (n + 1), b % (n + 1)) if n else (0, 0)
        i, j = min(i, j), max(i, j)
        if kind == 0:  # insert
            text = text[:i] + insert + text[i:]
        elif kind == 1:  # delete a range
            text = text[:i] + text[j:]
        elif kind == 2:  # replace a range
            text = text[:i] + insert + text[j:]
        elif kind == 3:  # repeat a range
            text = text[:j] + text[i:j] * 3 + text[j:]
        else:  # cut off
            text = text[:i]
    return text[:MAX_INPUT]


def mutated_texts(seeds: list[str]) -> st.SearchStrategy[str]:
    """A real sample with a few edits (insertions of meaningful tokens or random text, deletions,
    repetitions, truncation), or random text now and then."""
    fragment = st.one_of(st.sampled_from(TOKENS), st.text(max_size=40))
    edit = st.tuples(st.integers(0, 4), st.integers(0, MAX_INPUT), st.integers(0, MAX_INPUT), fragment)
    edited = st.builds(_apply, st.sampled_from(seeds), st.lists(edit, min_size=1, max_size=6))
    return st.one_of(edited, edited, edited, st.text(max_size=2000))


def _apply_bytes(data: bytes, edits: list[tuple[int, int, int, bytes]]) -> bytes:
    for kind, a, b, insert in edits:
        n = len(data)
        i, j = (a % (n + 1), b % (n + 1)) if n else (0, 0)
        i, j = min(i, j), max(i, j)
        if kind == 0:
            data = data[:i] + insert + data[i:]
        elif kind == 1:
            data = data[:i] + data[j:]
        elif kind == 2:
            data = data[:i] + insert + data[j:]
        elif kind == 3 and i < n:  # flip bits of one byte
            data = data[:i] + bytes([data[i] ^ (b % 255 + 1)]) + data[i + 1 :]
        else:
            data = data[:i]
    return data[:MAX_INPUT]


def mutated_bytes(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Byte-level edits of seed blobs (bit flips, insertions, deletions, truncation), or random bytes."""
    fragment = st.one_of(st.binary(max_size=40), st.sampled_from([b"\x00" * 8, b"\xff" * 8, b"9" * 400]))
    edit = st.tuples(st.integers(0, 4), st.integers(0, MAX_INPUT), st.integers(0, MAX_INPUT), fragment)
    edited = st.builds(_apply_bytes, st.sampled_from(seeds), st.lists(edit, min_size=1, max_size=6))
    return st.one_of(edited, edited, edited, st.binary(max_size=2000))
