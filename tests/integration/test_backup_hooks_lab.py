"""Pre/post hooks around a real backup on the lab's free host: pre before the snapshot, post after it is
removed (with the outcome), and a failing pre hook stops the VM before any snapshot is taken."""

from __future__ import annotations

from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler.config import load_config
from reconciler.facts.inventory import BackupSnapshot
from reconciler.operations.backup import BackupOptions, backup_policy
from reconciler.operations.ports import BackupHost
from reconciler.operations.repositories import open_repository
from reconciler.repository import Repository

pytestmark = pytest.mark.lab

VM = "web01"


def _config(lab: LabHandle, root: Path) -> Path:
    cfg = root / "config"
    cfg.mkdir()
    pw = root / "pw"
    pw.write_text(lab.password(lab.free))
    pw.chmod(0o600)
    info = lab.host(lab.free)
    events = root / "events"
    record = f'echo "$ESXI_RECONCILER_HOOK $ESXI_RECONCILER_STATUS $ESXI_RECONCILER_POINT_ID" >> {events}'
    (cfg / "all.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: {lab.free}}}
spec:
  address: {info["api"]["host"]}
  credentials: {{user: root, password: {{file: {pw}}}}}
  api: {{port: {info["api"]["port"]}, thumbprint: "{info["api"]["thumbprint_sha256"]}"}}
  ssh: {{port: {info["ssh"]["port"]}, host_key: "{info["ssh"]["host_key_fingerprint"]}"}}
---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: r}}
spec:
  backend: {{type: local, path: {root / "repo"}}}
  encryption: {{enabled: false}}
---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: hooked}}
spec:
  host: {lab.free}
  repository: r
  vms: {{names: [{VM}]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 3}}
  hooks:
    pre:
      - command: [sh, -c, 'echo "pre $ESXI_RECONCILER_VM" >> {events}']
    post:
      - command: [sh, -c, '{record}']
---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: pre-fails}}
spec:
  host: {lab.free}
  repository: r
  vms: {{names: [{VM}]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 3}}
  hooks:
    pre:
      - command: [sh, -c, 'echo "the database is not ready" >&2; exit 3']
        timeout: 30s
    post:
      - command: [sh, -c, '{record}']
---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: post-fails}}
spec:
  host: {lab.free}
  repository: r
  vms: {{names: [{VM}]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 3}}
  hooks:
    post:
      - command: [sh, -c, 'echo "could not thaw" >&2; exit 1']
"""
    )
    return cfg


def test_hooks_around_a_real_backup(lab: LabHandle, tmp_path: Path) -> None:
    cfg = _config(lab, tmp_path)
    Repository.init(tmp_path / "repo")
    desired = load_config(cfg)
    events = tmp_path / "events"

    def on_snapshot(host: BackupHost, bs: BackupSnapshot) -> None:
        with events.open("a") as f:
            f.write(f"snapshot {bs.snapshot.name}\n")

    options = BackupOptions(workers=2, on_snapshot=on_snapshot)
    (ok,) = backup_policy(desired, "hooked", options=options)
    assert ok.ok, ok.error
    lines = events.read_text().splitlines()
    assert lines[0] == f"pre {VM}"
    assert lines[1].startswith("snapshot ")
    assert lines[2] == f"post success {ok.point_id}"
    assert len(lines) == 3

    events.unlink()
    (failed,) = backup_policy(desired, "pre-fails", options=options)
    assert not failed.ok and failed.point_id is None
    assert failed.error is not None
    assert "pre hook 1 (sh) failed: exit 3: the database is not ready; no snapshot taken" in failed.error
    assert events.read_text().splitlines() == ["post failure "]  # no snapshot line: none was taken
    for vm in lab.client(lab.free).state()["vms"]:
        assert not vm.get("snapshots"), vm["name"]
    repo = open_repository(desired.repository("r"))
    points = repo.list_points(vm=VM)
    assert [p.id for p in points] == [ok.point_id]
    assert points[0].policy == "hooked"

    # a failing post hook (on_failure: fail) fails the run; the complete point stays
    (post,) = backup_policy(desired, "post-fails", options=options)
    assert not post.ok and post.point_id is not None
    assert post.error == "post hook 1 (sh) failed: exit 1: could not thaw"
    assert post.point_id in {p.id for p in repo.list_points(vm=VM)}
