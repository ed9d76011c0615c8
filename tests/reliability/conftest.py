"""The reliability suite's fixtures: ``ledger`` (what a case injected and checked, see ledger.py)."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.reliability.ledger import Ledger, ledger_path, record_outcome, reset


def pytest_configure(config: pytest.Config) -> None:
    """A new run starts a new ledger, so the report shows this run's figures only. (Called when this
    conftest is imported, i.e. once per run that collects the suite.)"""
    reset(ledger_path())


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    return Ledger(case=request.node.nodeid, path=ledger_path())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" or (report.when == "setup" and (report.failed or report.skipped)):
        record_outcome(ledger_path(), item.nodeid, report.outcome)
    elif report.when == "teardown" and report.failed:
        record_outcome(ledger_path(), item.nodeid, "failed")
    return report
