"""Crash consistency of the daemon's cycle: ``esxi-reconciler run --once`` (observe, plan, apply: a
backup, a verification and a test restore, then the status) SIGKILLed at named steps of the cycle and of
the work it runs. The next cycle does what is left: the status store opens, the backup and the test
restore run (the temporary VM a killed test restore left is removed first), and nothing is lost.

Each case gets policies of its own name, so its jobs are due at once (no history, no point yet) on
the real clock of the child process, while the repository keeps every earlier case's points."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import count

import pytest

from esxisim.handle import LabHandle
from reconciler.status.store import StatusStore, status_path
from tests.integration.labconfig import policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline, check_repositories
from tests.reliability.ledger import Ledger
from tests.reliability.site import Site, assert_killed

pytestmark = pytest.mark.lab

STEPS = (
    "cycle.planned",
    "backup.chunk-written",
    "cycle.outcome-recorded",
    "restore.test-powered-on",
    "cycle.concluded",
)
_cases = count(1)


@pytest.fixture(scope="module")
def site(rlab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """With a first point of web01 (what the test restores are made from)."""
    site = Site.create(
        rlab, tmp_path_factory.mktemp("crash-daemon"), policy_yaml("seed", rlab.free, ["web01"])
    )
    first = site.run("backup", "seed")
    assert first.code == 0, first.err[-3000:]
    yield site


def events(err: str) -> list[str]:
    """The log events of a run (JSON lines), for failure messages."""
    out = []
    for line in err.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        out.append(" ".join(f"{k}={v}" for k, v in doc.items() if k not in ("logger", "timestamp", "level")))
    return out


def due_now(site: Site, case: int) -> None:
    """A backup policy and a verify policy (with a test restore of web01 on the licensed host) that have
    never run, so the next cycle does all three."""
    lab = site.lab
    (site.config / "policies" / "p.yaml").write_text(
        policy_yaml(f"daemon-{case}", lab.free, ["web01"], schedule="{every: 1h}", extra="  cbt: unmanaged\n")
        + f"""---
apiVersion: esxi-reconciler/v1
kind: VerifyPolicy
metadata: {{name: check-{case}}}
spec:
  repository: r
  schedule: {{every: 1h}}
  read_data_percent: 100
  test_restore: {{host: {lab.licensed}, vms: [web01]}}
"""
    )


@pytest.mark.parametrize("step", STEPS)
def test_a_daemon_cycle_killed_at_a_step_loses_nothing(site: Site, ledger: Ledger, step: str) -> None:
    case = next(_cases)
    due_now(site, case)
    site.lab.client(site.lab.free).guest_write("web01", 5, seed=9000 + case)
    before = baseline(site.lab, {"r": site.repo})

    killed = site.run("run", "--once", kill_at=step)
    assert_killed(killed, step)
    ledger.count("kill_points")
    found = check_repositories(ledger, before)
    assert not found.lost and not found.problems, found

    again = site.run("run", "--once")
    assert again.code == 0, again.err[-4000:]
    if step == "restore.test-powered-on":
        assert "restore.unfinished_removed" in again.err, events(again.err)  # the temporary VM went first
    with StatusStore.open(status_path(site.state), readonly=True) as store:
        done = {(e.kind, e.status) for e in store.actions(limit=100) if e.subject.endswith("web01")}
    assert ("backup", "ok") in done and ("test-restore", "ok") in done, done
    assert [p for p in site.repo.list_points() if p.policy == f"daemon-{case}"]
    assert_nothing_lost(ledger, before)
