"""What a host says, when it says something odd: a ``.vmx`` with unknown keys, a Latin-1 byte next to
``|XX`` escapes, CRLF line ends and quotes inside a value is backed up, exported and restored with every
byte it had; vim-cmd answering garbage (esxisim's ``vimcmd-garbage`` fault: the command runs, its output
is unreadable) gives one clean error naming the command, and leaves no snapshot and no restore point.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config
from tests.reliability.ledger import Ledger
from tests.reliability.secretscan import SecretScan

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

MiB = 1 << 20
VM = "odd vmx"
ODD_LINES = (
    b'foo.bar = "baz"\r\n'  # an unknown key, a CRLF line end
    b'guestinfo.note = "caf\xe9 |22quoted|22 |7C pipe"\n'  # a Latin-1 byte next to escapes
    b'annotation = "he said "hi" twice"\n'  # quotes inside a value, unescaped
    b"# a comment the product must keep\n"
    b"\n"
    b'zzz.unknownDevice0.present = "TRUE"\n'
)


@dataclass
class Env:
    lab: LabHandle
    root: Path
    config: Path
    state: Path

    def cli(self, *args: str) -> int:
        return cli.main(
            ["--config", str(self.config), "--state-dir", str(self.state), "--log-format", "json", *args]
        )

    def vmid(self, name: str) -> str:
        return next(
            str(v["vmid"]) for v in self.lab.client(self.lab.free).state()["vms"] if v["name"] == name
        )

    def snapshots(self, name: str) -> list[object]:
        vm = next(v for v in self.lab.client(self.lab.free).state()["vms"] if v["name"] == name)
        return list(vm.get("snapshots") or [])


def _destroy(lab: LabHandle, prefix: str) -> None:
    for vm in lab.client(lab.free).state()["vms"]:
        if str(vm["name"]).startswith(prefix):
            lab.client(lab.free).vimcmd(["vmsvc/power.off", str(vm["vmid"])])
            assert lab.client(lab.free).vimcmd(["vmsvc/destroy", str(vm["vmid"])]).exit == 0


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory, secret_scan: SecretScan) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("host-output")
    disks = [{"size": 4 * MiB, "fill": 0.5, "seed": 9401}]
    lab.client(lab.free).create_vm({"name": VM, "disks": disks, "power": "poweredOff"})
    try:
        vmx = lab.local_path(lab.free, f"[datastore1] {VM}/{VM}.vmx")
        vmx.write_bytes(vmx.read_bytes() + ODD_LINES)
        reload = lab.client(lab.free).vimcmd(["vmsvc/reload", next(
            str(v["vmid"]) for v in lab.client(lab.free).state()["vms"] if v["name"] == VM
        )])  # fmt: skip
        assert reload.exit == 0, reload
        lab.client(lab.free).vimcmd(["vmsvc/power.on", Env(lab, root, root, root).vmid(VM)])
        config = write_lab_config(lab, root, policy_yaml("odd", lab.free, [VM]))
        Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
        secret_scan.watch_config(config, root / "state")
        yield Env(lab, root, config, root / "state")
    finally:
        lab.clear_faults()
        _destroy(lab, VM)


def test_an_odd_vmx_is_kept_byte_for_byte(
    env: Env, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = env.lab
    original = lab.local_path(lab.free, f"[datastore1] {VM}/{VM}.vmx").read_bytes()
    assert ODD_LINES in original
    assert env.cli("backup", "odd") == 0, capsys.readouterr()
    assert "1 of 1 VMs backed up" in capsys.readouterr().out
    # the export of the raw disks carries the .vmx exactly as it was backed up
    out = env.root / "export"
    assert env.cli("export", VM, "--to", str(out)) == 0, capsys.readouterr()
    capsys.readouterr()
    assert (out / f"{VM}.vmx").read_bytes() == original
    # a restored VM keeps every line the restore does not have to change
    assert env.cli("restore", VM, "--name", f"{VM} copy") == 0, capsys.readouterr()
    out_text = capsys.readouterr().out
    m = re.search(r"at (\[datastore1\] .*\.vmx)\n", out_text)
    assert m is not None, out_text
    restored = lab.local_path(lab.free, m.group(1)).read_bytes()
    for line in ODD_LINES.replace(b"\r\n", b"\n").split(b"\n"):
        assert line in restored, line
    ledger.count("hostile_inputs", len([line for line in ODD_LINES.split(b"\n") if line.strip()]))


@pytest.mark.parametrize(
    ("command", "operation"),
    [
        ("vmsvc/snapshot.get", "backup"),  # read after the snapshot is made: the snapshot must go again
        ("", "backup"),  # every vim-cmd command
        ("vmsvc/power.on", "restore"),  # a restored VM powered on
    ],
)
def test_garbage_from_vim_cmd_is_a_clean_error_naming_the_command(
    env: Env, ledger: Ledger, capsys: pytest.CaptureFixture[str], command: str, operation: str
) -> None:
    lab = env.lab
    points_before = _points(env, capsys)
    if operation == "restore" and not points_before:  # this case alone
        assert env.cli("backup", "odd") == 0, capsys.readouterr()
        capsys.readouterr()
    lab.fault(lab.free, "vimcmd-garbage", command=command)
    try:
        if operation == "backup":
            code = env.cli("backup", "odd")
        else:
            code = env.cli("restore", VM, "--name", f"{VM} garbage", "--power-on")
        captured = capsys.readouterr()
    finally:
        lab.fault(lab.free, "vimcmd-garbage", command=command, enabled=False)
    assert code == 1, captured
    shown = captured.out + captured.err
    named = command or "vmsvc/snapshot.get"  # with every command garbled, the first one parsed
    said = [line for line in shown.splitlines() if f"vim-cmd {named}" in line and not line.startswith("{")]
    assert said and all(len(line) < 600 and "\x1b" not in line for line in said), shown  # one line, escaped
    assert "Traceback" not in shown
    assert env.snapshots(VM) == []  # nothing left on the host
    if operation == "backup":
        assert _points(env, capsys) == points_before  # and no half restore point
    else:
        _destroy(lab, f"{VM} garbage")
    ledger.count("faults_injected")
    ledger.count("snapshots_left", len(env.snapshots(VM)))


def _points(env: Env, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert env.cli("points", "--vm", VM, "--json") == 0
    import json

    return sorted(p["id"] for p in json.loads(capsys.readouterr().out))
