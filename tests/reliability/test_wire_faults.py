"""Faults on the wire, injected by the lab while the real product runs: an SSH connection dropped in the
middle of a backup's read and of a restore's write, API requests answered with HTTP 503, an API that
does not answer in time, an API that is down when the daemon starts and comes back, a host whose TLS
certificate or SSH host key changed (refused: possible man in the middle), a host that answers slowly
(limits kept, the snapshot timeout honoured). Each run fails (or succeeds) with a message that names the
cause; the next run succeeds; nothing is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from esxisim import MiB
from esxisim.handle import LabHandle
from reconciler.config import load_config
from reconciler.daemon import Daemon
from reconciler.daemon.notify import Notifier
from reconciler.facts.inventory import FrozenDisk
from reconciler.facts.points import DiskRecord
from reconciler.operations.backup import BackupOptions, backup_policy
from reconciler.operations.hosts import connect
from reconciler.operations.observe import observe
from reconciler.operations.restore import RestoreOptions, restore_new_vm
from reconciler.status.store import StatusStore, StatusStoreError, status_path
from tests.integration.labconfig import policy_yaml
from tests.reliability.invariants import assert_nothing_lost, baseline
from tests.reliability.ledger import Ledger
from tests.reliability.site import Site
from tests.waiting import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

_seeds = count(6100)


BIG = "wire-big"
"""A scratch VM on the free host with 32 MiB of data: more than the SSH windows and socket buffers hold,
so a connection cut during its transfer really cuts the transfer."""


@pytest.fixture(scope="module")
def site(rlab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Policies ``free`` (web01), ``big`` (BIG) and ``lic`` (app201, app202, app203: more VMs than the
    host's limit of 2 at once), each with a first point."""
    rlab.client(rlab.free).create_vm(
        {"name": BIG, "power": "poweredOn", "disks": [{"size": 64 * MiB, "fill": 0.5, "seed": 61}]}
    )
    policies = (
        policy_yaml("free", rlab.free, ["web01"])
        + policy_yaml("big", rlab.free, [BIG])
        + policy_yaml("lic", rlab.licensed, ["app201", "app202", "app203"])
    )
    site = Site.create(rlab, tmp_path_factory.mktemp("wire"), policies)
    try:
        for name in ("free", "big", "lic"):
            first = site.run("backup", name)
            assert first.code == 0, first.err[-3000:]
        yield site
    finally:
        (vm,) = [v for v in rlab.client(rlab.free).state()["vms"] if v["name"] == BIG]
        rlab.vimcmd(rlab.free, "vmsvc/power.off", vm["vmid"])
        assert rlab.vimcmd(rlab.free, "vmsvc/destroy", vm["vmid"]).exit == 0


@pytest.fixture
def faults(site: Site) -> Iterator[LabHandle]:
    """The site's lab; every fault cleared after the case."""
    try:
        yield site.lab
    finally:
        site.lab.clear_faults()


def ok_again(site: Site, capsys: pytest.CaptureFixture[str], policy: str) -> None:
    again = site.cli(capsys, "backup", policy)
    assert again.code == 0, again.out + again.err[-3000:]
    assert "Traceback" not in again.out + again.err


def test_ssh_dropped_in_the_middle_of_a_read(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full read over SSH (the digest program's stream) of 32 MiB is cut after its first block: the
    VM fails naming the lost connection, the snapshot is removed over a new connection, no point is
    written; the next run succeeds."""
    before = baseline(faults, {"r": site.repo})
    dropped: list[int] = []

    def drop(disk: FrozenDisk, offset: int, length: int) -> None:
        if not dropped:
            dropped.append(faults.fault(faults.free, "ssh-drop")["killed"])

    desired = load_config(site.config)
    options = BackupOptions(on_data=drop, transport="ssh", full=True)
    (result,) = backup_policy(desired, "big", options=options)
    ledger.count("faults_injected")
    assert dropped and dropped[0] >= 1
    assert not result.ok and result.point_id is None
    assert "connection" in (result.error or "").lower() or "ssh" in (result.error or "").lower(), result.error
    assert set(site.repo.point_ids()) == before.points["r"]
    ok_again(site, capsys, "big")
    assert_nothing_lost(ledger, before)


def test_ssh_dropped_in_the_middle_of_a_restore_write(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ``dd`` writing a restored disk is cut: the restore fails naming the cause and removes the
    folder it made; the same restore then succeeds."""
    before = baseline(faults, {"r": site.repo})
    point = next(p for p in reversed(site.repo.list_points()) if p.vm.name == BIG)
    dropped: list[int] = []

    def drop(disk: DiskRecord, offset: int, length: int) -> None:
        if not dropped:
            dropped.append(faults.fault(faults.free, "ssh-drop")["killed"])

    desired = load_config(site.config)
    with connect(desired.host(faults.free)) as host, pytest.raises(Exception) as failed:
        restore_new_vm(host, site.repo, point, RestoreOptions(name="big-copy", on_data=drop))
    ledger.count("faults_injected")
    assert dropped and dropped[0] >= 1
    message = str(failed.value).lower()
    assert "connection" in message or "ssh" in message or "dd" in message, failed.value
    assert_nothing_lost(ledger, before)  # the half-written folder went with the failure

    again = site.cli(capsys, "restore", BIG, "--name", "big-copy")
    assert again.code == 0, again.out + again.err[-3000:]
    (vm,) = [v for v in faults.client(faults.free).state()["vms"] if v["name"] == "big-copy"]
    assert faults.vimcmd(faults.free, "vmsvc/unregister", vm["vmid"]).exit == 0
    assert faults.run(faults.free, "rm -rf /vmfs/volumes/datastore1/big-copy").exit == 0
    assert_nothing_lost(ledger, before)


def test_api_answering_503_is_retried_and_a_lasting_one_is_reported(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    before = baseline(faults, {"r": site.repo})
    faults.fault(faults.licensed, "api-error", status=503, count=2)  # hostd restarting: two refusals
    ledger.count("faults_injected")
    ok_again(site, capsys, "lic")

    faults.fault(faults.licensed, "api-error", status=503)  # until cleared
    ledger.count("faults_injected")
    failed = site.cli(capsys, "backup", "lic")
    assert failed.code == 1
    assert "503 Service Unavailable" in failed.err and "127.0.0.1:" in failed.err, failed.err[-2000:]
    assert "Traceback" not in failed.out + failed.err
    faults.fault(faults.licensed, "clear")
    ok_again(site, capsys, "lic")
    assert_nothing_lost(ledger, before)


def test_an_api_that_does_not_answer_in_time_is_an_observation_not_a_hang(
    site: Site, faults: LabHandle, ledger: Ledger
) -> None:
    """Every API call of the licensed host takes 3 s; observation gives it 1.5 s and goes on: the host
    is unreachable with the reason, the free host is observed as usual."""
    desired = load_config(site.config)
    faults.fault(faults.licensed, "api-slow", delay_ms=3000)
    ledger.count("faults_injected")
    started = time.monotonic()
    seen = observe(desired, now=datetime.now(timezone.utc), history={}, host_timeout=1.5)
    took = time.monotonic() - started
    slow, fine = seen.hosts[faults.licensed], seen.hosts[faults.free]
    assert not slow.reachable and slow.error and "1.5" in slow.error, slow
    assert fine.reachable and {v.name for v in fine.vms} >= {"web01"}
    assert took < 10, took


def test_a_slow_host_keeps_the_limits_and_the_snapshot_timeout(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """API calls take 200 ms: three VMs are backed up, never more than two at once (the host's limit);
    a snapshot that takes 4 s against a timeout of 2 s fails the VM after the timeout, naming it, and
    the snapshot that appears late is removed."""
    before = baseline(faults, {"r": site.repo})
    client = faults.client(faults.licensed)
    client.reset_concurrency()
    faults.fault(faults.licensed, "api-slow", delay_ms=200)
    ledger.count("faults_injected")
    ok_again(site, capsys, "lic")
    seen = client.concurrency()["snapshotted_vms"]
    assert 1 <= seen["peak"] <= 2 and seen["peak_per_datastore"]["datastore1"] <= 2, seen

    faults.fault(faults.licensed, "clear")
    policies = site.config / "policies" / "p.yaml"
    text = policies.read_text()
    policies.write_text(
        text + policy_yaml("quick", faults.licensed, ["app202"], extra="  snapshot_timeout: 2s\n")
    )
    try:
        faults.fault(faults.licensed, "snapshot-slow", delay_ms=4000)
        ledger.count("faults_injected")
        started = time.monotonic()
        failed = site.cli(capsys, "backup", "quick")
        assert failed.code == 1
        assert "app202: FAILED" in failed.out and "2.0 s" in failed.out, failed.out
        assert time.monotonic() - started < 60
        faults.fault(faults.licensed, "clear")
        ok_again(site, capsys, "quick")
    finally:
        policies.write_text(text)
    assert_nothing_lost(ledger, before)


def test_a_changed_tls_certificate_is_refused(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    before = baseline(faults, {"r": site.repo})
    faults.fault(faults.licensed, "tls-rotate")
    ledger.count("faults_injected")
    refused = site.cli(capsys, "backup", "lic")
    assert refused.code == 1
    assert "presented a TLS certificate with SHA256 thumbprint" in refused.err
    assert "possible man in the middle" in refused.err and "api.thumbprint" in refused.err
    assert "Traceback" not in refused.out + refused.err
    assert set(site.repo.point_ids()) == before.points["r"]
    faults.fault(faults.licensed, "clear")
    ok_again(site, capsys, "lic")
    assert_nothing_lost(ledger, before)


def test_a_changed_ssh_host_key_is_refused(
    site: Site, faults: LabHandle, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    before = baseline(faults, {"r": site.repo})
    faults.fault(faults.free, "ssh-hostkey-rotate")
    ledger.count("faults_injected")
    refused = site.cli(capsys, "backup", "free")
    assert refused.code == 1
    assert "has no SSH host key with the pinned fingerprint" in refused.out + refused.err
    assert "possible man in the middle" in refused.out + refused.err
    assert "Traceback" not in refused.out + refused.err
    assert set(site.repo.point_ids()) == before.points["r"]
    faults.fault(faults.free, "clear")
    ok_again(site, capsys, "free")
    assert_nothing_lost(ledger, before)


def test_an_api_down_when_the_daemon_starts_is_backed_up_once_it_is_back(
    site: Site, faults: LabHandle, ledger: Ledger, tmp_path: Path
) -> None:
    """The daemon starts while the licensed host's API refuses connections: the host's condition says
    so (naming the cause) and no backup runs; once the API answers again, the next cycle backs up."""
    policies = site.config / "policies" / "p.yaml"
    text = policies.read_text()
    policies.write_text(policy_yaml("hourly", faults.licensed, ["app203"], schedule="{every: 1h}"))
    before = baseline(faults, {"r": site.repo})
    state = tmp_path / "state"
    faults.fault(faults.licensed, "api-down")
    ledger.count("faults_injected")
    daemon = Daemon(site.config, state, resync=1.0, debounce=0.3, min_interval=0.5, notifier=Notifier({}))
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(daemon.run()), name="daemon")
    thread.start()
    try:

        def host_condition() -> Any:
            try:
                with StatusStore.open(status_path(state), readonly=True) as store:
                    return {c.key: c for c in store.conditions()}.get(("host", faults.licensed))
            except StatusStoreError:  # not written yet (the daemon's first cycle has not begun)
                return None

        down = wait_for(
            "the host reported unreachable", lambda: (c := host_condition()) and c.status != "Ready" and c
        )
        assert "refused" in down.message.lower(), down
        assert not [p for p in site.repo.list_points() if p.policy == "hourly"]
        faults.fault(faults.licensed, "api-up")
        wait_for(
            "a backup once the API is back",
            lambda: [p for p in site.repo.list_points() if p.policy == "hourly"],
        )
    finally:
        daemon.request_stop()
        thread.join(timeout=120)
        policies.write_text(text)
    assert codes == [0]
    assert_nothing_lost(ledger, before)


wait_for = partial(wait_until, timeout=90.0, poll=0.3)
