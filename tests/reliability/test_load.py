"""Load: a lab of 4 hosts × 10 VMs (two datastores per host) backed up twice, every host at once —
first by one ``apply`` (the daemon's path: hosts in parallel), then by one ``backup`` process per host
at the same time (incrementals after guest writes). The lab counts the VMs holding a snapshot at once
per host and per datastore: the host's ``concurrent_backups`` (3) and ``concurrent_backups_per_datastore``
(2) must hold, and be reached (the runs are really parallel). The peak resident memory of every backup
process is measured and must stay bounded; every point verifies, no snapshot is left.

The CI variant has 2 MiB disks; ``RELIABILITY_LONG=1`` runs 6 hosts × 20 VMs with 64 MiB + 16 MiB disks.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from esxisim import MiB
from esxisim.handle import LabHandle
from esxisim.lab import DatastoreSpec, Lab, lab_spec
from esxisim.pytest_plugin import stop_lab
from reconciler.repository import Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config
from tests.reliability.invariants import assert_nothing_lost, baseline
from tests.reliability.ledger import Ledger, long_runs
from tests.reliability.site import FAST_KDF, ROOT

pytestmark = pytest.mark.lab

LONG = long_runs()
HOSTS, VMS = (6, 20) if LONG else (4, 10)
DISKS = (64 * MiB, 16 * MiB) if LONG else (2 * MiB,)
PER_HOST, PER_DATASTORE = 3, 2
LIMITS = f"{{concurrent_backups: {PER_HOST}, concurrent_backups_per_datastore: {PER_DATASTORE}}}"
RSS_LIMIT_MIB = 768 if LONG else 256
"""Peak resident memory allowed to one backup process: the interpreter and its libraries (~120 MiB)
plus the pipeline's bounded buffers (8 chunks of 1 MiB per disk being read, a few 4 MiB transfer pieces
per stream) for every VM the limits let run at once, with a wide margin."""

MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("peak-rss-kib", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def load_lab() -> Iterator[LabHandle]:
    """HOSTS hosts (free and licensed in turn) with VMS VMs each, half of them on a second datastore."""
    specs = []
    for spec in lab_spec(hosts=HOSTS, licenses=("free", "licensed"), vms=VMS, disk_sizes=DISKS):
        vms = tuple(replace(vm, datastore=f"datastore{1 + i % 2}") for i, vm in enumerate(spec.vms))
        specs.append(
            replace(spec, vms=vms, datastores=(DatastoreSpec("datastore1"), DatastoreSpec("datastore2")))
        )
    simlab = Lab(hosts=specs, die_with_parent=True)
    handle: LabHandle | None = None
    try:
        simlab.start()
        handle = LabHandle(simlab)
        yield handle
    finally:
        stop_lab(simlab, handle)


def measured(argv: list[str]) -> subprocess.Popen[str]:
    """``argv`` in a child that reports the peak resident memory of its own child on stderr."""
    return subprocess.Popen(
        [sys.executable, "-c", MEASURE, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, peak RSS in MiB) of a :func:`measured` run."""
    out, err = proc.communicate(timeout=1800)
    line = next(x for x in reversed(err.splitlines()) if x.startswith("peak-rss-kib"))
    return proc.returncode, out, err, int(line.split()[1]) / 1024


def test_hosts_backed_up_at_once_keep_their_limits_and_memory(
    load_lab: LabHandle, tmp_path: Path, ledger: Ledger
) -> None:
    lab = load_lab
    hosts = list(lab.lab.hosts)
    names = {h: [vm["name"] for vm in lab.host(h)["vms"]] for h in hosts}
    policies = "".join(
        policy_yaml(f"all-{h}", h, names[h], schedule="{every: 1h}", extra="  cbt: unmanaged\n")
        for h in hosts
    )
    config = write_lab_config(lab, tmp_path, policies, hosts=hosts, limits=LIMITS)
    repo = Repository.init(tmp_path / "repo", PASSPHRASE, kdf=FAST_KDF)
    before = baseline(lab, {"r": repo})
    base = [
        sys.executable,
        "-m",
        "reconciler.cli",
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    base += ["--log-format", "json", "--log-level", "warning"]
    for h in hosts:
        lab.client(h).reset_concurrency()

    # 1. one apply: every host at once, each within its limits
    code, out, err, rss = finish(measured([*base, "apply", "--yes"]))
    assert code == 0, out[-3000:] + err[-3000:]
    peaks = [rss]
    assert len(repo.point_ids()) == HOSTS * VMS

    # 2. one backup process per host, all at once, after the guests wrote
    for h in hosts:
        for i, vm in enumerate(names[h][::3]):
            lab.client(h).guest_write(vm, 10, seed=100 + i)
    runs = [measured([*base, "backup", f"all-{h}"]) for h in hosts]
    for proc in runs:
        code, out, err, rss = finish(proc)
        assert code == 0, out[-3000:] + err[-3000:]
        assert f"{VMS} of {VMS} VMs backed up" in out
        peaks.append(rss)
    assert len(repo.point_ids()) == 2 * HOSTS * VMS

    seen = {h: lab.client(h).concurrency()["snapshotted_vms"] for h in hosts}
    for h, c in seen.items():
        assert c["now"] == 0, (h, c)
        assert c["peak"] <= PER_HOST, (h, c)
        assert all(n <= PER_DATASTORE for n in c["peak_per_datastore"].values()), (h, c)
    assert max(c["peak"] for c in seen.values()) >= 2, seen  # the VMs did run side by side
    assert max(peaks) < RSS_LIMIT_MIB, peaks
    print(f"load: {HOSTS}x{VMS} VMs twice, concurrency {seen}, peak RSS MiB {[round(p) for p in peaks]}")
    assert_nothing_lost(ledger, before)
