"""A repository on S3 (moto's server) written by two processes at once, each with its own state
directory and backing up its own lab host, the way two sites share one bucket; chunks both produce are
stored once. Then every read path works from the bucket: points, verify, restore as a new VM
(byte-identical to the source disks), export."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.config import load_config
from reconciler.operations.hosts import connect
from reconciler.operations.repositories import open_repository
from tests.integration.labconfig import policy_yaml, private_file, write_lab_config
from tests.s3server import S3Server

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

MiB = 1024 * 1024
SITE_A = "s3 site-a"  # on the free host
SITE_B = "s3 site-b"  # on the licensed host: the same disk content, so the same chunks
DISKS = [{"size": 8 * MiB, "fill": 0.5, "seed": 7301}, {"size": 4 * MiB, "fill": 0.75, "seed": 7302}]
_CLI = "import sys; from reconciler.cli import main; sys.exit(main(sys.argv[1:]))"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _destroy(lab: LabHandle, host: str, prefix: str) -> None:
    for vm in lab.client(host).state()["vms"]:
        if str(vm["name"]).startswith(prefix):
            lab.client(host).vimcmd(["vmsvc/power.off", str(vm["vmid"])])
            assert lab.client(host).vimcmd(["vmsvc/destroy", str(vm["vmid"])]).exit == 0


@pytest.fixture
def site_vms(lab: LabHandle) -> Iterator[None]:
    lab.client(lab.free).create_vm({"name": SITE_A, "disks": DISKS, "power": "poweredOn"})
    lab.client(lab.licensed).create_vm({"name": SITE_B, "disks": DISKS, "power": "poweredOn"})
    try:
        yield
    finally:
        _destroy(lab, lab.free, SITE_A)
        _destroy(lab, lab.licensed, SITE_B)


def _s3_config(lab: LabHandle, root: Path, s3: S3Server, bucket: str) -> Path:
    policies = policy_yaml("site-a", lab.free, [SITE_A]) + policy_yaml("site-b", lab.licensed, [SITE_B])
    cfg = write_lab_config(lab, root, policies)
    key_id = private_file(root / "secrets" / "s3.id", s3.access_key)
    secret = private_file(root / "secrets" / "s3.secret", s3.secret_key)
    repo = cfg / "repositories" / "r.yaml"
    local = repo.read_text().splitlines()
    backend = next(i for i, line in enumerate(local) if "backend:" in line)
    local[backend] = (
        f"  backend: {{type: s3, endpoint: '{s3.endpoint}', bucket: {bucket}, prefix: sites/shared,"
        f" path_style: true, credentials: {{access_key_id: {{file: {key_id}}},"
        f" secret_access_key: {{file: {secret}}}}}}}"
    )
    repo.write_text("\n".join(local) + "\n")
    return cfg


def _flat_sha(lab: LabHandle, host_name: str, cfg: Path, vm_name: str) -> list[str]:
    """SHA-256 of each disk's flat file of ``vm_name``, by disk key."""
    desired = load_config(cfg)
    with connect(desired.host(host_name)) as host:
        vm = host.find_vm(vm_name)
        found = []
        for disk in sorted(vm.disks, key=lambda d: d.key):
            desc = host.read_descriptor(disk.file)
            assert desc.flat_extent is not None and desc.flat_extent.file_name
            flat = disk.file.rsplit("/", 1)[0] + "/" + desc.flat_extent.file_name
            found.append(sha(lab.local_path(host_name, flat).read_bytes()))
        return found


@pytest.mark.usefixtures("site_vms")
def test_two_sites_write_one_bucket_at_once_and_restore_from_it(
    lab: LabHandle, tmp_path: Path, s3_server: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _s3_config(lab, tmp_path, s3_server, s3_bucket)
    base = ["--config", str(cfg), "--log-level", "warning"]
    assert cli.main([*base, "repo", "init", "r"]) == 0, capsys.readouterr()
    capsys.readouterr()

    # two writer processes, separate state directories, started together
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def writer(site: str) -> subprocess.Popen[str]:
        argv = [*base, "--state-dir", str(tmp_path / f"state-{site}"), "--json", "backup", f"site-{site}"]
        return subprocess.Popen(
            [sys.executable, "-c", _CLI, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    procs = [writer("a"), writer("b")]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert json.loads(out)["ok"] is True

    desired = load_config(cfg)
    repo = open_repository(desired.repository("r"))
    points = {p.vm.name: p for p in repo.list_points()}
    assert set(points) == {SITE_A, SITE_B}
    used = {
        name: {cid for disk in point.disks for cid in repo.read_index(disk.index) if any(cid)}
        for name, point in points.items()
    }
    assert used[SITE_A] == used[SITE_B] and used[SITE_A]  # the same data: the same chunks...
    disk_chunks = used[SITE_A]
    stored = sum(1 for _ in repo.backend.list("chunks"))
    config_chunks = {bytes.fromhex(c) for p in points.values() for f in p.files for c in f.chunks}
    assert stored == len((disk_chunks | config_chunks) - {bytes(32)})  # ...stored once
    assert list(repo.backend.list("locks")) == []  # both writers released their locks

    # read paths straight from the bucket
    assert cli.main([*base, "--json", "verify", "r"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    source = _flat_sha(lab, lab.licensed, cfg, SITE_B)
    restored = f"{SITE_B} from s3"
    assert cli.main([*base, "restore", SITE_B, "--name", restored]) == 0, capsys.readouterr()
    try:
        assert _flat_sha(lab, lab.licensed, cfg, restored) == source
    finally:
        _destroy(lab, lab.licensed, restored)
    out_dir = tmp_path / "export"
    assert cli.main([*base, "export", SITE_A, "--to", str(out_dir)]) == 0, capsys.readouterr()
    images = sorted(out_dir.glob("*.img"))
    assert [sha(i.read_bytes()) for i in images] == _flat_sha(lab, lab.free, cfg, SITE_A)
