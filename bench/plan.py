"""Planner benchmark: desired and observed state for 100 hosts x 50 VMs with 10 restore points each
(every backup due), planned and rendered, in this process (the planner is pure: no host, no
repository). Prints the time of each step; the target is plan + render under one second.

    .venv/bin/python -m bench.plan [--hosts 100] [--vms 50] [--points 10] [--runs 3] [--profile]

The desired state is loaded from YAML by the real loader: one free host in ten (with SSH), the rest
licensed; one repository; one policy per host selecting all its VMs (daily at 02:00, keep_last 10,
CBT enabled, so the CBT rules run too), and a verify policy. The observed state: every host reachable,
50 powered-on VMs of two disks each with CBT on, one datastore; the repository holds 10 daily points per
VM, the newest one 25 hours old, so every backup is due and nothing is pruned. ``--profile`` prints the
cProfile of one plan + render (top 25 by cumulative time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from reconciler.config import DesiredState, load_config
from reconciler.facts.inventory import DatastoreInfo, DiskInfo, VmInfo
from reconciler.facts.points import RestorePoint, VmRef
from reconciler.planning.observed import HostObservation, ObservedState, RepositoryObservation
from reconciler.planning.plan import plan
from reconciler.planning.render import render_text

UTC = timezone.utc
GiB = 1 << 30
NOW = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
THUMB = ":".join(["AB"] * 32)
HOST_KEY = "SHA256:glTDKakoUPbVOd03b0gW7idkUX2l4CNVFK9DMWRIDXo"


def host_name(i: int) -> str:
    return f"esxi{i:03d}"


def desired_state(directory: Path, hosts: int, keep: int) -> DesiredState:
    docs = [
        """---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {name: nas}
spec:
  backend: {type: local, path: /srv/nas}
  encryption: {enabled: false}
  prune: {enabled: true, max_deletions_per_run: 1000}
---
apiVersion: esxi-reconciler/v1
kind: VerifyPolicy
metadata: {name: weekly}
spec: {repository: nas, schedule: {daily: {at: "05:00"}}, read_data_percent: 10}
"""
    ]
    for i in range(hosts):
        name = host_name(i)
        free = i % 10 == 0
        docs.append(
            f"""---
apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: {name}}}
spec:
  address: {name}.lan
  license: {"free" if free else "licensed"}
  credentials: {{user: root, password: {{env: PW}}}}
  api: {{thumbprint: "{THUMB}"}}
  ssh: {{host_key: "{HOST_KEY}"}}
---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: p-{name}}}
spec:
  host: {name}
  repository: nas
  vms: {{all: true}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: {keep}}}
  cbt: enabled
"""
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text("".join(docs))
    return load_config(directory)


def vm_info(host: str, j: int) -> VmInfo:
    name = f"vm{j:02d}-{host}"
    disks = tuple(
        DiskInfo(
            key=2000 + k,
            label=f"Hard disk {k + 1}",
            node=f"scsi0:{k}",
            file=f"[ds1] {name}/{name}{'' if k == 0 else f'_{k}'}.vmdk",
            chain=(f"[ds1] {name}/{name}{'' if k == 0 else f'_{k}'}.vmdk",),
            capacity=(40 if k == 0 else 100) * GiB,
            change_id="52 ab/7",
            uuid=None,
            mode="persistent",
            thin=True,
        )
        for k in range(2)
    )
    return VmInfo(
        vmid=str(j + 1),
        name=name,
        uuid=f"uuid-{host}-{j}",
        instance_uuid=None,
        power_state="poweredOn",
        vmx_path=f"[ds1] {name}/{name}.vmx",
        datastore="ds1",
        disks=disks,
        snapshots=(),
        cbt_enabled=True,
        hw_version="vmx-19",
    )


def observed_state(hosts: int, vms: int, points: int) -> ObservedState:
    observations = {}
    all_points: list[RestorePoint] = []
    serial = 0
    for i in range(hosts):
        name = host_name(i)
        infos = tuple(vm_info(name, j) for j in range(vms))
        observations[name] = HostObservation(
            name=name,
            reachable=True,
            license="free" if i % 10 == 0 else "licensed",
            ssh_enabled=True,
            vms=infos,
            datastores=(DatastoreInfo("ds1", 10_000 * GiB, 5_000 * GiB, True, "VMFS"),),
        )
        for info in infos:
            for k in range(points):
                when = NOW - timedelta(hours=25) - timedelta(days=k)
                serial += 1
                all_points.append(
                    RestorePoint(
                        id=f"{when:%Y%m%dT%H%M%S%f}Z-{serial:08x}",
                        policy=f"p-{name}",
                        vm=VmRef(info.name, info.uuid or "", name, info.vmid),
                        started=when,
                        snapshot_time=when,
                        finished=when + timedelta(minutes=10),
                        status="success",
                        mode="cbt" if k else "full",
                        config_revision="sha256:bench",
                    )
                )
    repo = RepositoryObservation("nas", reachable=True, points=tuple(all_points))
    return ObservedState(time=NOW, hosts=observations, repositories={"nas": repo}, history={})


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one plan + render")
    args = parser.parse_args()
    load = Path("/proc/loadavg").read_text().split()[0]
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        t0 = time.perf_counter()
        desired = desired_state(Path(tmp), args.hosts, args.points)
        t1 = time.perf_counter()
        observed = observed_state(args.hosts, args.vms, args.points)
        t2 = time.perf_counter()
    print(
        f"{args.hosts} hosts x {args.vms} VMs x {args.points} points; load average {load}."
        f" Config loaded in {t1 - t0:.2f} s, observed state built in {t2 - t1:.2f} s (not counted)."
    )
    best = best_cpu = float("inf")
    for run in range(1, args.runs + 1):
        cpu0, a = time.process_time(), time.perf_counter()
        result = plan(desired, observed)
        b = time.perf_counter()
        text = render_text(result, color=False)
        c, cpu1 = time.perf_counter(), time.process_time()
        best, best_cpu = min(best, c - a), min(best_cpu, cpu1 - cpu0)
        print(
            f"run {run}: plan {b - a:.3f} s ({len(result.actions)} actions, {len(result.notices)} notices),"
            f" render {c - b:.3f} s ({len(text.splitlines())} lines), total {c - a:.3f} s"
            f" (CPU {cpu1 - cpu0:.3f} s)"
        )
    verdict = "met" if best < 1 else "NOT met"
    print(f"best plan + render: {best:.3f} s wall, {best_cpu:.3f} s CPU (target < 1 s wall: {verdict})")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        render_text(plan(desired, observed), color=False)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
