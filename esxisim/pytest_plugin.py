"""pytest fixtures for tests against the simulated ESXi lab (``pytest_plugins = ["esxisim.pytest_plugin"]``).

* ``lab`` (session): two hosts started once with the same ``Lab`` code as ``python -m esxisim up`` —
  ``esxi1`` with a free licence (VMs ``web01``, ``db 01``, ``ファイル鯖 "q" $(x)``) and ``esxi2`` licensed
  (``app201`` ...) — each VM with a 32 MiB and a 16 MiB disk. It is always stopped at the end, and the
  teardown fails if any process, mount or file of the lab survives. Its processes get SIGTERM if the
  test session itself dies.
* ``lab.api(host)``: a pyvmomi ServiceInstance pinned to the host's SHA-256 thumbprint.
* ``lab.ssh(host)``: a paramiko SSHClient pinned to the host key (RejectPolicy + the lab's known_hosts).
* ``lab_faults``: the lab, with every fault cleared (and every host up) after the test.
* With ``ESXISIM_KEEP_LOGS=DIR``, each lab's host logs are copied to ``DIR/<lab>/<host>/`` (``<lab>``:
  the name of its state directory) before its files are removed.
* ``lab_of_version(v)`` (session): a lab whose hosts answer as ESXi ``v`` (``6.7``, ``7.0`` or ``8.0``;
  docs/lab.md says what differs): ``esxi1`` free and ``esxi2`` licensed, one VM each (``web01`` and
  ``app201``, one 8 MiB disk). Started on first use, kept for the session, stopped at its end like
  ``lab``.

Tests that need the lab are marked ``@pytest.mark.lab``; they are skipped when not running as root.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from esxisim.handle import TEST_DISK_SIZES, LabHandle
from esxisim.lab import ESXI_VERSIONS, Lab, lab_spec


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the simulated ESXi lab (vcsim + OpenSSH); runs as root")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="the esxisim lab needs root (mount namespaces, sshd)")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


def stop_lab(simlab: Lab, handle: LabHandle | None) -> None:
    """Stop a lab and fail if anything of it survives (also for labs a test module starts itself; its
    logs saved first if ``ESXISIM_KEEP_LOGS``)."""
    state_dir = simlab.state_dir
    if handle is not None:
        handle.close()
    simlab.stop(remove_files=False)
    keep_logs = os.environ.get("ESXISIM_KEEP_LOGS")
    if keep_logs:
        simlab.save_logs(Path(keep_logs) / state_dir.name)
    simlab.remove_files()
    leftovers = simlab.leftovers()
    assert not leftovers, f"the lab left things behind: {leftovers}"
    assert not state_dir.exists(), f"the lab's state dir {state_dir} survived"


@pytest.fixture(scope="session")
def lab() -> Iterator[LabHandle]:
    """Two simulated hosts (esxi1 free, esxi2 licensed) for the whole session; always stopped."""
    spec = lab_spec(hosts=2, licenses=("free", "licensed"), vms=3, disk_sizes=TEST_DISK_SIZES)
    simlab = Lab(hosts=spec, die_with_parent=True)
    handle: LabHandle | None = None
    try:
        simlab.start()
        handle = LabHandle(simlab)
        yield handle
    finally:
        stop_lab(simlab, handle)


@pytest.fixture(scope="session")
def lab_of_version() -> Iterator[Callable[[str], LabHandle]]:
    """A factory of labs answering as one ESXi version each (started once per version, all stopped at
    the end of the session)."""
    started: dict[str, tuple[Lab, LabHandle | None]] = {}

    def get(version: str) -> LabHandle:
        if version not in ESXI_VERSIONS:
            raise ValueError(f"the lab simulates ESXi {', '.join(ESXI_VERSIONS)}, not {version!r}")
        if version not in started:
            spec = lab_spec(
                hosts=2, licenses=("free", "licensed"), vms=1, disk_sizes=(8 << 20,), esxi_version=version
            )
            simlab = Lab(hosts=spec, die_with_parent=True)
            started[version] = (simlab, None)
            simlab.start()
            started[version] = (simlab, LabHandle(simlab))
        handle = started[version][1]
        assert handle is not None
        return handle

    try:
        yield get
    finally:
        failures: list[AssertionError] = []
        for simlab, handle in started.values():
            try:
                stop_lab(simlab, handle)
            except AssertionError as exc:  # stop every lab, then report
                failures.append(exc)
        if failures:
            raise failures[0]


@pytest.fixture
def lab_faults(lab: LabHandle) -> Iterator[LabHandle]:
    """The lab; every fault is cleared and every host is up again after the test."""
    try:
        yield lab
    finally:
        lab.clear_faults()
