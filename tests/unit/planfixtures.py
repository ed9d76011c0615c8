"""Hand-built desired and observed state for planner and renderer tests (no host, no repository).

Desired state is loaded from small YAML documents (the real loader fills every default); observed
state is built from the host layer's and repository's own value types.
"""

from __future__ import annotations

import itertools
import json
import textwrap
import zlib
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

from reconciler.config import DesiredState, load_config
from reconciler.facts.inventory import SNAPSHOT_PREFIX, DatastoreInfo, DiskInfo, SnapshotInfo, VmInfo
from reconciler.facts.points import RestorePoint, VmRef
from reconciler.planning.observed import HostObservation, ObservedState, RepositoryObservation, RunRecord

UTC = timezone.utc
GiB = 2**30
NOW_TEXT = "2026-11-26 03:00"
THUMB256 = ":".join(["AB"] * 32)
HOST_KEY = "SHA256:glTDKakoUPbVOd03b0gW7idkUX2l4CNVFK9DMWRIDXo"


def host_doc(name: str, license: str, *, ssh: bool = True) -> str:
    ssh_spec = f'{{host_key: "{HOST_KEY}"}}' if ssh else "{enabled: false}"
    return f"""---
apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: {name}}}
spec:
  address: {name}.lan
  license: {license}
  credentials: {{user: root, password: {{env: PW}}}}
  api: {{thumbprint: "{THUMB256}"}}
  ssh: {ssh_spec}
  limits: {{min_datastore_free: {{size: 1GiB, percent: 10}}}}
"""


def repo_doc(
    name: str = "nas", *, prune: bool = True, max_deletions: int = 100, path: str | None = None
) -> str:
    return f"""---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: {name}}}
spec:
  backend: {{type: local, path: {path or "/srv/" + name}}}
  encryption: {{enabled: false}}
  prune: {{enabled: {str(prune).lower()}, max_deletions_per_run: {max_deletions}}}
"""


def policy_doc(
    name: str,
    host: str,
    vms: list[str] | None,
    *,
    schedule: str = '{daily: {at: "02:00"}}',
    retention: str = "{keep_last: 3}",
    repository: str = "nas",
    cbt: str = "unmanaged",
    extra: str = "",
) -> str:
    """One BackupPolicy; ``vms=None`` selects all VMs; ``extra``: more spec lines (2-space indented)."""
    selector = "{all: true}" if vms is None else f"{{names: {json.dumps(vms, ensure_ascii=False)}}}"
    return f"""---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: {name}}}
spec:
  host: {host}
  repository: {repository}
  vms: {selector}
  schedule: {schedule}
  retention: {retention}
  cbt: {cbt}
{textwrap.indent(textwrap.dedent(extra), "  ")}"""


def verify_doc(
    name: str, *, repository: str = "nas", schedule: str = '{daily: {at: "05:00"}}', test_restore: str = ""
) -> str:
    extra = f", test_restore: {test_restore}" if test_restore else ""
    return f"""---
apiVersion: esxi-reconciler/v1
kind: VerifyPolicy
metadata: {{name: {name}}}
spec: {{repository: {repository}, schedule: {schedule}, read_data_percent: 10{extra}}}
"""


def load_desired(
    tmp_path: Path,
    *documents: str,
    repositories: Iterable[str] | None = None,
) -> DesiredState:
    """esxi1 (free), esxi2 (licensed, no SSH), repository ``nas`` (prune on) unless ``repositories``
    replaces it, plus ``documents``."""
    text = host_doc("esxi1", "free") + host_doc("esxi2", "licensed", ssh=False)
    text += "".join(repositories if repositories is not None else [repo_doc()])
    text += "".join(documents)
    directory = tmp_path / "config"
    directory.mkdir(exist_ok=True)
    (directory / "config.yaml").write_text(text)
    return load_config(directory)


_ids = itertools.count(1)


def snapshot(name: str) -> SnapshotInfo:
    return SnapshotInfo(
        id=str(next(_ids)), name=name, description="", created=None, parent_id=None, quiesced=False
    )


def ours(suffix: str = "20261126T010000Z-abcd") -> SnapshotInfo:
    return snapshot(SNAPSHOT_PREFIX + suffix)


def vm(
    name: str,
    *,
    vmid: str | None = None,
    power: str = "poweredOn",
    cbt: bool = False,
    snapshots: Iterable[SnapshotInfo] = (),
    datastore: str = "ds1",
) -> VmInfo:
    vmid = vmid or str(zlib.crc32(name.encode()) % 1000)
    disks = tuple(
        DiskInfo(
            key=key,
            label=f"Hard disk {key}",
            node=f"scsi0:{key - 1}",
            file=path,
            chain=(path,),
            capacity=size,
            change_id=None,
            uuid=None,
            mode="persistent",
            thin=True,
        )
        for key, path, size in (
            (1, f"[{datastore}] {name}/{name}.vmdk", 32 << 20),
            (2, f"[{datastore}] {name}/{name}_1.vmdk", 16 << 20),
        )
    )
    return VmInfo(
        vmid=vmid,
        name=name,
        uuid=f"uuid-{name}",
        instance_uuid=None,
        power_state=power,
        vmx_path=f"[{datastore}] {name}/{name}.vmx",
        datastore=datastore,
        disks=disks,
        snapshots=tuple(snapshots),
        cbt_enabled=cbt,
        hw_version="vmx-19",
    )


def host(
    name: str,
    vms: Iterable[VmInfo],
    *,
    license: str | None = None,
    ssh: bool = True,
    free: int = 500 * GiB,
    capacity: int = 1000 * GiB,
) -> HostObservation:
    return HostObservation(
        name=name,
        reachable=True,
        license=license or ("free" if name == "esxi1" else "licensed"),
        ssh_enabled=ssh,
        vms=tuple(vms),
        datastores=(DatastoreInfo("ds1", capacity, free, True, "VMFS"),),
    )


def down(name: str, error: str = "ConnectionRefusedError: [Errno 111] Connection refused") -> HostObservation:
    return HostObservation(name=name, reachable=False, error=error)


def point(
    policy: str,
    vm_name: str,
    when: datetime,
    *,
    host_name: str = "esxi1",
    status: str = "success",
    protected: bool = False,
    uuid: str | None = None,
) -> RestorePoint:
    """A point whose backup started and froze at ``when`` and finished ten minutes later."""
    return RestorePoint(
        id=f"{when.astimezone(UTC):%Y%m%dT%H%M%S%f}Z-{next(_ids):08x}",
        policy=policy,
        vm=VmRef(vm_name, uuid or f"uuid-{vm_name}", host_name, "1"),
        started=when,
        snapshot_time=when,
        finished=when + timedelta(minutes=10),
        status=status,  # type: ignore[arg-type]
        mode="full",
        config_revision="sha256:test",
        protected=protected,
    )


def observed(
    now: datetime,
    hosts: Iterable[HostObservation],
    points: Iterable[RestorePoint] = (),
    *,
    history: Mapping[str, RunRecord] | None = None,
    repositories: Mapping[str, RepositoryObservation] | None = None,
) -> ObservedState:
    repos = dict(repositories) if repositories is not None else {}
    if "nas" not in repos:
        repos["nas"] = RepositoryObservation("nas", reachable=True, points=tuple(points))
    return ObservedState(
        time=now, hosts={h.name: h for h in hosts}, repositories=repos, history=history or {}
    )


def at(text: str) -> datetime:
    """``"2026-11-26 03:00"`` as UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)
