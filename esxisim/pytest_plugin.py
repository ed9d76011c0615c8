"""pytest fixtures for tests against the simulated ESXi lab (``pytest_plugins = ["esxisim.pytest_plugin"]``).

* ``lab`` (session): two hosts started once with the same ``Lab`` code as ``python -m esxisim up`` —
  ``esxi1`` with a free licence (VMs ``web01``, ``db 01``, ``ファイル鯖 "q" $(x)``) and ``esxi2`` licensed
  (``app201`` ...) — each VM with a 32 MiB and a 16 MiB disk. It is always stopped at the end, and the
  teardown fails if any process, mount or file of the lab survives. Its processes get SIGTERM if the
  test session itself dies.
* ``lab.api(host)``: a pyvmomi ServiceInstance pinned to the host's SHA-256 thumbprint.
* ``lab.ssh(host)``: a paramiko SSHClient pinned to the host key (RejectPolicy + the lab's known_hosts).
* ``lab_faults``: the lab, with every fault cleared (and every host up) after the test.

Tests that need the lab are marked ``@pytest.mark.lab``; they are skipped when not running as root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from esxisim.handle import TEST_DISK_SIZES, LabHandle
from esxisim.lab import Lab, lab_spec


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the simulated ESXi lab (vcsim + OpenSSH); runs as root")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="the esxisim lab needs root (mount namespaces, sshd)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab() -> Iterator[LabHandle]:
    """Two simulated hosts (esxi1 free, esxi2 licensed) for the whole session; always stopped."""
    spec = lab_spec(hosts=2, licenses=("free", "licensed"), vms=3, disk_sizes=TEST_DISK_SIZES)
    simlab = Lab(hosts=spec, die_with_parent=True)
    state_dir = simlab.state_dir
    handle: LabHandle | None = None
    try:
        simlab.start()
        handle = LabHandle(simlab)
        yield handle
    finally:
        if handle is not None:
            handle.close()
        simlab.stop()
        leftovers = simlab.leftovers()
        assert not leftovers, f"the lab left things behind: {leftovers}"
        assert not state_dir.exists(), f"the lab's state dir {state_dir} survived"


@pytest.fixture
def lab_faults(lab: LabHandle) -> Iterator[LabHandle]:
    """The lab; every fault is cleared and every host is up again after the test."""
    try:
        yield lab
    finally:
        lab.clear_faults()
