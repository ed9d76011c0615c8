"""The packaging tests (``make test-packaging``): they build the Debian package and the container
image and take 10 to 15 minutes on two cores, so ``make test`` skips them unless
``ESXI_RECONCILER_TEST_PACKAGING=1`` is set (which ``make test-packaging`` does)."""

from __future__ import annotations

import os

import pytest

ENABLE = "ESXI_RECONCILER_TEST_PACKAGING"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(ENABLE) == "1":
        return
    skip = pytest.mark.skip(reason=f"packaging tests are opt-in: make test-packaging (or {ENABLE}=1)")
    for item in items:
        if item.path.parent.name == "packaging":
            item.add_marker(skip)
