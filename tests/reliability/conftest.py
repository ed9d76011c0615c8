"""The reliability suite's fixtures: ``ledger`` (what a case injected and checked, see ledger.py) and
``secret_scan`` (every secret the fixtures register is looked for in everything the product printed,
logged and wrote: secretscan.py; on for every test of the suite)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.reliability.ledger import Ledger, ledger_path, record_outcome, reset
from tests.reliability.secretscan import SecretScan

_SCAN = SecretScan()
"""The session's registry (module-level: the report hook feeds it too)."""


def pytest_configure(config: pytest.Config) -> None:
    """A new run starts a new ledger, so the report shows this run's figures only. (Called when this
    conftest is imported, i.e. once per run that collects the suite.)"""
    reset(ledger_path())


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    return Ledger(case=request.node.nodeid, path=ledger_path())


@pytest.fixture(scope="package", autouse=True)
def secret_scan() -> Iterator[SecretScan]:
    """The registry; what ``capsys.readouterr()`` returns is scanned as it is read. After the suite's
    last test the registered directories are scanned, ``secrets_found`` is counted, and any finding
    fails (that last test's teardown)."""
    original = pytest.CaptureFixture.readouterr

    def readouterr(self: pytest.CaptureFixture[Any]) -> Any:
        result = original(self)
        if _SCAN.active:  # a test of this suite (the session goes on with other directories' tests)
            _SCAN.output(result.out, "captured stdout")
            _SCAN.output(result.err, "captured stderr")
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pytest.CaptureFixture, "readouterr", readouterr)
        yield _SCAN
    _SCAN.scan_directories()
    Ledger("tests/reliability/conftest.py::secret_scan", ledger_path()).count(
        "secrets_found", len(_SCAN.findings)
    )
    assert not _SCAN.findings, f"secrets in clear: {_SCAN.findings}"


@pytest.fixture(autouse=True)
def _no_secret_in_this_test(secret_scan: SecretScan) -> Iterator[None]:
    """Fail the test whose output held a secret (its captured output is scanned by the report hook)."""
    before = len(secret_scan.findings)
    secret_scan.active = True
    try:
        yield
    finally:
        secret_scan.active = False
    found = secret_scan.findings[before:]
    assert not found, f"secrets in clear in this test's output: {found}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    for title, text in report.sections:  # captured output the test did not read, and log records
        _SCAN.output(text, f"{item.nodeid}: {title}")
    if report.when == "call" or (report.when == "setup" and (report.failed or report.skipped)):
        record_outcome(ledger_path(), item.nodeid, report.outcome)
    elif report.when == "teardown" and report.failed:
        record_outcome(ledger_path(), item.nodeid, "failed")
    return report
