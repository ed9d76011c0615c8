"""Shared pytest configuration: the esxisim lab fixtures (``lab``, ``lab_faults``) for lab tests, and
``restore_logging`` for tests that run ``cli.main`` in-process."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

pytest_plugins = ["esxisim.pytest_plugin", "tests.s3server"]


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests calling ``cli.main`` in-process: it configures logging process-wide; put it back
    afterwards for the other tests of the session (use with ``pytest.mark.usefixtures``)."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        for handler in list(lg.handlers):
            if handler not in handlers:
                lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate
    logging.captureWarnings(False)
    structlog.reset_defaults()
