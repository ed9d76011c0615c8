"""The reliability suite's own lab and a place to run the product against it.

* ``rlab`` (session): two hosts like the shared ``lab`` (``esxi1`` free: ``web01``, ``db 01``, a hostile
  name; ``esxi2`` licensed: ``app201``..``app203`` with CBT on) but with tiny disks (4 MiB and 2 MiB), so
  a case that kills, breaks or reboots something costs seconds, and its own processes, so that breaking a
  host never disturbs the other test modules. Stopped at the end like ``lab``; faults are cleared after
  every case that uses ``rlab_faults``.
* :class:`Site`: a config (both hosts, repository ``r``), a state directory and the repository; ``run``
  starts the real CLI in a child process (optionally with a kill point, :mod:`reconciler.killpoint`),
  ``cli`` runs it in this process (faster; for the runs that must succeed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from esxisim import MiB
from esxisim.handle import LabHandle
from esxisim.lab import HostSpec, Lab, lab_spec
from esxisim.pytest_plugin import stop_lab
from reconciler import cli
from reconciler.killpoint import ENV as KILL_ENV
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, write_lab_config

ROOT = Path(__file__).resolve().parents[2]
DISK_SIZES = (4 * MiB, 2 * MiB)
FAST_KDF = KdfParams(memory_kib=1024, iterations=1, lanes=1)
KILLED = -9
"""A child's return code after SIGKILL (subprocess)."""


def reliability_spec() -> tuple[HostSpec, ...]:
    free, licensed = lab_spec(hosts=2, licenses=("free", "licensed"), vms=3, disk_sizes=DISK_SIZES)
    licensed = replace(licensed, vms=tuple(replace(vm, cbt=True) for vm in licensed.vms))
    return (free, licensed)


@pytest.fixture(scope="session")
def rlab() -> Iterator[LabHandle]:
    """The suite's own two hosts (module doc); always stopped."""
    simlab = Lab(hosts=reliability_spec(), die_with_parent=True)
    handle: LabHandle | None = None
    try:
        simlab.start()
        handle = LabHandle(simlab)
        yield handle
    finally:
        stop_lab(simlab, handle)


@pytest.fixture
def rlab_faults(rlab: LabHandle) -> Iterator[LabHandle]:
    """``rlab``; every fault cleared and every host up again after the case."""
    try:
        yield rlab
    finally:
        rlab.clear_faults()


@dataclass(frozen=True)
class Run:
    """A finished CLI run: exit status (``KILLED`` after SIGKILL) and its output."""

    code: int
    out: str
    err: str

    @property
    def killed(self) -> bool:
        return self.code == KILLED


def assert_killed(run: Run, step: str) -> None:
    """The run ended by SIGKILL at ``step`` (not earlier, not by finishing: the step was reached)."""
    assert run.killed, f"the run did not reach {step}: exit {run.code}\n{run.out[-2000:]}{run.err[-3000:]}"


@dataclass
class Site:
    """A config pointed at a lab, its state directory and its repository ``r``."""

    lab: LabHandle
    root: Path
    config: Path
    state: Path
    repo: Repository

    @classmethod
    def create(cls, lab: LabHandle, root: Path, policies: str, *, repository_extra: str = "") -> Site:
        config = write_lab_config(lab, root, policies, repository_extra=repository_extra)
        repo = Repository.init(
            root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1)
        )
        return cls(lab, root, config, root / "state", repo)

    def argv(self, args: Sequence[str]) -> list[str]:
        return ["--config", str(self.config), "--state-dir", str(self.state), *args]

    def run(self, *args: str, kill_at: str | None = None, timeout: float = 180.0) -> Run:
        """``esxi-reconciler ARGS`` in a child process; ``kill_at``: the step where it SIGKILLs itself."""
        env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
        if kill_at is not None:
            env[KILL_ENV] = kill_at
        proc = subprocess.run(
            [sys.executable, "-m", "reconciler.cli", "--log-format", "json", *self.argv(args)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> Run:
        """``esxi-reconciler ARGS`` in this process (use with the ``restore_logging`` fixture)."""
        capsys.readouterr()
        code = cli.main(["--log-format", "json", *self.argv(args)])
        out, err = capsys.readouterr()
        return Run(code, out, err)
