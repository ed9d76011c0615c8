"""The suite's own plumbing: a case's counts reach the run's ledger."""

from __future__ import annotations

from tests.reliability.ledger import Ledger, ledger_path


def test_counts_reach_the_ledger(ledger: Ledger) -> None:
    ledger.count("fuzz_inputs", 0)
    assert ledger.path == ledger_path()
    assert f'"case": "{ledger.case}"' in ledger.path.read_text(encoding="utf-8")
