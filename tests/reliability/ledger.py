"""The figures of the reliability suite: what each case injected and what it checked.

Every test in ``tests/reliability`` counts what it did through the ``ledger`` fixture
(``ledger.count("kill_points")``); the conftest records each case's outcome. The counts go to one JSON
lines file per run (``RELIABILITY_LEDGER``, default ``.reliability/ledger.jsonl`` in the checkout),
which ``bench/reliability_report.py`` turns into the table in ``docs/reliability.md``.

A figure is only as honest as the assertion behind it: count ``points_verified`` after the verify
passed, ``snapshots_left`` with what the host really listed (0 is a count too: call
``ledger.count("snapshots_left", 0)`` so the report shows the check ran), never before the check.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Figure = Literal[
    "faults_injected",
    "kill_points",
    "hostile_inputs",
    "fuzz_inputs",
    "points_verified",
    "snapshots_left",
    "temporary_vms_left",
    "points_lost",
    "secrets_found",
]
FIGURES: tuple[Figure, ...] = (
    "faults_injected",
    "kill_points",
    "hostile_inputs",
    "fuzz_inputs",
    "points_verified",
    "snapshots_left",
    "temporary_vms_left",
    "points_lost",
    "secrets_found",
)
"""In the order the report prints them (after ``cases``)."""

DEFAULT_PATH = Path(__file__).resolve().parents[2] / ".reliability" / "ledger.jsonl"


def ledger_path() -> Path:
    return Path(os.environ.get("RELIABILITY_LEDGER", str(DEFAULT_PATH)))


def long_runs() -> bool:
    """Whether the long variants run (``RELIABILITY_LONG=1``, ``make test-reliability-long``)."""
    return os.environ.get("RELIABILITY_LONG", "") not in ("", "0")


_write_lock = threading.Lock()


def _append(path: Path, record: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with _write_lock, path.open("a", encoding="utf-8") as out:
        out.write(line)


@dataclass
class Ledger:
    """The counts of one case (one test); appended to the run's file as they happen, so a case that
    fails half-way still shows what it injected."""

    case: str
    path: Path

    def count(self, figure: Figure, n: int = 1) -> None:
        if figure not in FIGURES:
            raise ValueError(f"unknown figure {figure!r}")
        if n < 0:
            raise ValueError("counts are never negative")
        _append(self.path, {"case": self.case, "figure": figure, "n": n})


def record_outcome(path: Path, case: str, outcome: str) -> None:
    _append(path, {"case": case, "outcome": outcome})


def reset(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")


@dataclass(frozen=True)
class Totals:
    cases: int
    passed: int
    failed: int
    skipped: int
    figures: dict[str, int]
    touched: frozenset[str]
    """Figures some case counted (even with 0): a figure nobody counted is shown as not measured."""


def totals(path: Path) -> Totals:
    outcomes: dict[str, str] = {}
    figures: dict[str, int] = dict.fromkeys(FIGURES, 0)
    touched: set[str] = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if "outcome" in rec:
                # a case reported twice (setup error, then teardown) keeps its worst outcome
                previous = outcomes.get(rec["case"])
                if previous != "failed":
                    outcomes[rec["case"]] = rec["outcome"]
            else:
                figures[rec["figure"]] += int(rec["n"])
                touched.add(rec["figure"])
    values = list(outcomes.values())
    return Totals(
        cases=len(values),
        passed=values.count("passed"),
        failed=values.count("failed"),
        skipped=values.count("skipped"),
        figures=figures,
        touched=frozenset(touched),
    )
