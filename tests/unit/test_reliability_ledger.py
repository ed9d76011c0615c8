"""The reliability report counts what the cases recorded and fails on a lost point or a failed case."""

from __future__ import annotations

from pathlib import Path

from bench.reliability_report import main, render
from tests.reliability.ledger import Ledger, record_outcome, totals


def test_totals_and_report(tmp_path: Path, capsys: object) -> None:
    path = tmp_path / "ledger.jsonl"
    a = Ledger("case-a", path)
    a.count("kill_points")
    a.count("points_verified", 3)
    a.count("snapshots_left", 0)
    record_outcome(path, "case-a", "passed")
    record_outcome(path, "case-b", "skipped")
    t = totals(path)
    assert (t.cases, t.passed, t.skipped) == (2, 1, 1)
    assert t.figures["points_verified"] == 3
    text = render(t, markdown=False)
    assert "not measured" in text  # fuzz inputs: nobody counted them
    assert main(["--ledger", str(path)]) == 0


def test_a_lost_point_or_failed_case_fails_the_report(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    Ledger("case-a", path).count("points_lost", 1)
    record_outcome(path, "case-a", "passed")
    assert main(["--ledger", str(path)]) == 1
    path2 = tmp_path / "ledger2.jsonl"
    record_outcome(path2, "case-b", "failed")
    assert main(["--ledger", str(path2)]) == 1
