"""Hostile names end to end: VM, datastore and file names holding ``'``, ``"``, ``$()``, backticks, ``;``,
``|``, line breaks, ``../``, a leading ``-``, 240 bytes of Japanese, are backed up (full and incremental),
restored under a hostile new name onto a datastore with a hostile name, and exported to local
directories, on a lab of their own (a free host driven over SSH, a licensed one over the API and HTTPS).

What is asserted is what the hosts' shells *received* (esxisim/record.py): every command line is one the
product built with its quoting function, and every program got exactly the argv the product meant; no
injected command ran (no ``touch`` anywhere, no ``pwned`` file on the host); nothing the product wrote
landed outside the directory it was aimed at.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from esxisim.lab import DatastoreSpec, DiskSpec, HostSpec, Lab, VMSpec
from esxisim.pytest_plugin import stop_lab
from esxisim.record import RECORDED_PROGRAMS, Exec, ShellRecording
from reconciler import cli
from reconciler.esxi import vimcmd
from reconciler.repository import KdfParams, Repository
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config
from tests.reliability.ledger import Ledger
from tests.reliability.secretscan import SecretScan, private_files

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

MiB = 1 << 20
CANARY = "pwned"
"""Every injected command would create a file whose name starts with this."""

HOSTILE_DS = f"ds '$(touch {CANARY}-ds)' \"q\" ; | `touch {CANARY}-ds2` ファイル"
FREE_VMS = {
    "meta": f'it\'s "q" $(touch {CANARY}1) `touch {CANARY}2` ; touch {CANARY}3 | touch {CANARY}4 & > < \\ *',
    "newline": f"line\nbreak\n; touch {CANARY}5\n",
    "traversal": "../../escape",
    "dash": "-rf --help",
    "long": "長い名前" * 19,  # 76 characters, 228 bytes of UTF-8: its snapshot files are 249-251 bytes
}
LICENSED_VMS = {"url": f"url #frag ?q=1&x=%2e%2e/ $(touch {CANARY}6) ファイル"}
"""On the licensed host the product reads disks over HTTPS ``/folder`` URLs: ``#``, ``?``, ``&`` and ``%``
must be encoded, or another file is read."""
RESTORED_NAME = f"-restored '$(touch {CANARY}7)'\n\"x\"; `id`"


@dataclass
class Env:
    lab: LabHandle
    root: Path
    config: Path
    state: Path
    built: dict[str, tuple[str, ...]]
    """Every shell line the product built → the argv it was built from."""

    def cli(self, *args: str) -> int:
        return cli.main(
            ["--config", str(self.config), "--state-dir", str(self.state), "--log-format", "json", *args]
        )


def _hostile_lab() -> tuple[HostSpec, ...]:
    def vm(name: str, seed: int, datastore: str) -> VMSpec:
        disks = (
            DiskSpec(size=4 * MiB, fill=0.5, seed=seed),
            DiskSpec(size=2 * MiB, fill=0.25, seed=seed + 1),
        )
        return VMSpec(name=name, disks=disks, datastore=datastore)

    stores = (DatastoreSpec("datastore1", 20 << 30), DatastoreSpec(HOSTILE_DS, 20 << 30))
    free = tuple(vm(name, 9100 + 10 * i, HOSTILE_DS) for i, name in enumerate(FREE_VMS.values()))
    licensed = tuple(vm(name, 9200 + 10 * i, HOSTILE_DS) for i, name in enumerate(LICENSED_VMS.values()))
    return (
        HostSpec("esxi1", "free", free, datastores=stores),
        HostSpec("esxi2", "licensed", licensed, datastores=stores),
    )


@contextlib.contextmanager
def _spy_on_quoting(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, tuple[str, ...]]]:
    """Remember every line built by :func:`reconciler.esxi.vimcmd.command_line`, the one quoting function
    (patched in every module that imported it)."""
    built: dict[str, tuple[str, ...]] = {}
    original = vimcmd.command_line

    def spy(argv: Sequence[str]) -> str:
        line = original(argv)
        built[line] = tuple(str(a) for a in argv)
        return line

    users = [m for name, m in list(sys.modules.items()) if name.startswith("reconciler.")]
    for module in users:
        if getattr(module, "command_line", None) is original:
            monkeypatch.setattr(module, "command_line", spy)
    yield built


@pytest.fixture(scope="module")
def hostile_lab() -> Iterator[LabHandle]:
    simlab = Lab(hosts=_hostile_lab(), die_with_parent=True)
    handle: LabHandle | None = None
    try:
        simlab.start()
        handle = LabHandle(simlab)
        yield handle
    finally:
        stop_lab(simlab, handle)


@pytest.fixture(scope="module")
def env(
    hostile_lab: LabHandle, tmp_path_factory: pytest.TempPathFactory, secret_scan: SecretScan
) -> Iterator[Env]:
    lab = hostile_lab
    tmp_path = tmp_path_factory.mktemp("hostile")
    policies = policy_yaml("free", lab.free, list(FREE_VMS.values())) + policy_yaml(
        "licensed", lab.licensed, list(LICENSED_VMS.values())
    )
    config = write_lab_config(lab, tmp_path, policies)
    host_file = config / "hosts" / f"{lab.free}.yaml"  # the free host logs in with its SSH key
    key = lab.host(lab.free)["ssh"]["private_key"]
    host_file.write_text(
        host_file.read_text().replace("  ssh: {", f"  ssh: {{private_key: {{file: {json.dumps(key)}}}, ", 1)
    )
    Repository.init(tmp_path / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    secret_scan.watch_config(config, tmp_path / "state")
    with pytest.MonkeyPatch.context() as monkeypatch, _spy_on_quoting(monkeypatch) as built:
        yield Env(lab, tmp_path, config, tmp_path / "state", built)
    for host in (lab.free, lab.licensed):  # what the product wrote on the hosts, before the lab goes
        for store in lab.host(host)["datastores"]:
            secret_scan.scan_directory(Path(store["path"]), f"datastore {store['name']!r} of {host}")


# -- checks --------------------------------------------------------------------------------------------


def check_received(rec: ShellRecording, built: dict[str, tuple[str, ...]]) -> tuple[int, set[str]]:
    """Every line the host received is one the product built; each program the line started got exactly
    the argv meant; nothing else ran. Returns (lines checked, every argument the programs received)."""
    execs: dict[str, list[Exec]] = {}
    for e in rec.execs():
        execs.setdefault(e.line, []).append(e)
    lines = rec.lines()
    arguments: set[str] = set()
    for line in lines:
        # the one addition the product makes to a built line: dd's statistics on stderr are dropped
        text = line.text.removesuffix(" 2>/dev/null")
        assert text in built, f"the host received a line the product did not build: {line.text!r}"
        meant = built[text]
        started = execs.pop(line.id, [])
        top = [e.argv for e in started if e.depth == 0]
        if meant[0] in RECORDED_PROGRAMS:
            assert top == [meant], f"{line.text!r} ran {top}, not {meant}"
        else:
            assert top == [], f"{line.text!r} (a builtin) started {top}"
        for e in started:
            assert e.argv[0] != "touch", f"an injected command ran: {e.argv}"
            arguments.update(e.argv[1:])
    assert not execs, f"programs ran outside any received line: {execs}"
    return len(lines), arguments


def no_canary_on(lab: LabHandle, host: str) -> list[str]:
    """Files named like the canary anywhere on the host (its shell's view, and its datastores)."""
    found = lab.run(
        host, f"find / -xdev -name '{CANARY}*' 2>/dev/null; find /vmfs/volumes/ -name '{CANARY}*'"
    )
    local = [str(p) for p in lab.lab.host(host).dir.rglob(f"{CANARY}*")]
    return [*found.text.split("\n"), *local] if found.text.strip() or local else []


def esxi_folder(name: str) -> str:
    """The folder ESXi (and the lab) makes for a VM name: ``%``, ``/``, ``\\`` and control characters as
    ``%xx``."""
    return "".join(f"%{ord(c):02x}" if c in "%/\\" or ord(c) < 0x20 or ord(c) == 0x7F else c for c in name)


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the story -----------------------------------------------------------------------------------------


def test_hostile_names_reach_the_host_exactly_as_meant(
    env: Env, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = env.lab
    hostile_inputs = 0
    with lab.recording(lab.free) as free_rec, lab.recording(lab.licensed) as lic_rec:
        # full backups of every VM (free: vim-cmd snapshots, reads over SSH; licensed: API and HTTPS)
        for policy, names in (("free", FREE_VMS), ("licensed", LICENSED_VMS)):
            assert env.cli("backup", policy) == 0, capsys.readouterr()
            assert f"{len(names)} of {len(names)} VMs backed up" in capsys.readouterr().out
            hostile_inputs += len(names)
        # incremental backups after guest writes (free: the digest program over SSH)
        for name in FREE_VMS.values():
            lab.client(lab.free).guest_write(name, 5, seed=9301)
        assert env.cli("backup", "free") == 0, capsys.readouterr()
        hostile_inputs += len(FREE_VMS)
        capsys.readouterr()

        # restore as a new VM with a hostile name, onto the datastore with a hostile name
        meta = FREE_VMS["meta"]
        assert env.cli("restore", meta, "--name", RESTORED_NAME, "--datastore", HOSTILE_DS) == 0, (
            capsys.readouterr()
        )
        out = capsys.readouterr().out
        hostile_inputs += 2
        # a name with a leading dash is an argument after `--`
        assert env.cli("restore", "--", FREE_VMS["dash"]) == 0, capsys.readouterr()
        capsys.readouterr()
        # the long name: as a new VM under the default name, and over itself
        assert env.cli("restore", FREE_VMS["long"]) == 0, capsys.readouterr()
        capsys.readouterr()
        code = env.cli("restore", FREE_VMS["long"], "--overwrite", "--yes")
        assert code == 0, capsys.readouterr().err[-3000:]
        capsys.readouterr()
        hostile_inputs += 3
    free_lines, free_args = check_received(free_rec, env.built)
    lic_lines, _ = check_received(lic_rec, env.built)
    assert free_lines > 20 and lic_lines >= 0

    # every hostile name reached the free host's programs whole, as part of a path or as an argument
    folder_of = {name: esxi_folder(name) for name in FREE_VMS.values()}
    for name, folder in folder_of.items():
        assert any(f"/{folder}/" in arg for arg in free_args), f"{name!r} never reached a program"
    assert any(f"/vmfs/volumes/{HOSTILE_DS}/" in arg for arg in free_args)

    # the restored VM: its exact name, in a folder of the hostile datastore with no control character
    m = re.search(r"restored as new VM '.*' \(vmid (\d+)\) at (\[.*\] .*\.vmx)\n", out)
    assert m is not None, out
    restored = next(v for v in lab.client(lab.free).state()["vms"] if str(v["vmid"]) == m.group(1))
    assert restored["name"] == RESTORED_NAME
    assert restored["vmx"].startswith(f"[{HOSTILE_DS}] ") and "\n" not in restored["vmx"]

    assert no_canary_on(lab, lab.free) == [] and no_canary_on(lab, lab.licensed) == []
    hostile_inputs += 1  # the datastore name
    ledger.count("hostile_inputs", hostile_inputs)


def test_exports_stay_inside_their_directory(
    env: Env, ledger: Ledger, secret_scan: SecretScan, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exports of VMs whose names and file names hold ``../``, line breaks and 240 bytes, into a directory
    whose own name is 255 bytes: every file lands inside it, named without a separator or control
    character, and the disks are the backed-up bytes."""
    assert env.cli("points", "--json") == 0
    if len(json.loads(capsys.readouterr().out)) < len(FREE_VMS):  # this test alone
        assert env.cli("backup", "free") == 0, capsys.readouterr()
        capsys.readouterr()
    outside = env.root / "outside"
    outside.mkdir()
    before = files_under(env.root)
    exported = 0
    formats = ("raw", "vmdk", "stream-optimized")
    for i, key in enumerate(("traversal", "newline", "long", "meta")):
        for fmt in formats if key == "traversal" else formats[i % 3 : i % 3 + 1]:
            target = outside / "exports" / f"{key}-{fmt}" / ("x" * 255)
            assert env.cli("export", FREE_VMS[key], "--to", str(target), "--format", fmt) == 0, (
                capsys.readouterr()
            )
            capsys.readouterr()
            written = files_under(target)
            assert written, key
            for path in written:
                assert path.parent == target, path
                assert not any(unicodedata.category(c) == "Cc" for c in path.name), path
                assert len(path.name.encode()) <= 255
            exported += 1
    new = sorted(set(files_under(env.root)) - set(before))
    escaped = [p for p in new if outside / "exports" not in p.parents and env.state not in p.parents]
    assert escaped == [], escaped
    secret_scan.directory(outside / "exports", "exports")
    ledger.count("hostile_inputs", exported)


FOREIGN_SNAPSHOT = f'user\'s "snap"\n  + backup esxi1/evil\n--Snapshot Id        : 1\n$(touch {CANARY}8)'
"""A user's snapshot whose name fakes a line of the plan and a line of ``snapshot.get``."""


def test_a_hostile_foreign_snapshot_is_kept_and_shown_escaped(
    env: Env, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A snapshot the product did not make blocks the VM's backup, is named escaped in the plan and in
    the backup's error, and is still there afterwards with its name."""
    lab = env.lab
    name = FREE_VMS["dash"]
    vmid = next(str(v["vmid"]) for v in lab.client(lab.free).state()["vms"] if v["name"] == name)
    made = lab.client(lab.free).vimcmd(["vmsvc/snapshot.create", vmid, FOREIGN_SNAPSHOT, "mine", "0", "0"])
    assert made.exit == 0, made
    try:
        with lab.recording(lab.free) as rec:
            assert env.cli("plan") in (0, 2), capsys.readouterr()
            plan = capsys.readouterr().out
            assert env.cli("backup", "free", "--vm", name) == 1
            captured = capsys.readouterr()
        check_received(rec, env.built)
        shown = 'user\'s "snap"\\n  + backup esxi1/evil\\n--Snapshot Id        : 1\\n$(touch pwned8)'
        assert f"foreign snapshot '{shown}' blocks backup" in plan, plan
        assert not any(
            line.startswith(("  + backup esxi1/evil", "--Snapshot Id")) for line in plan.split("\n")
        )
        assert "snapshots that are not ours" in captured.out and FOREIGN_SNAPSHOT not in captured.out
        vm = next(v for v in lab.client(lab.free).state()["vms"] if v["name"] == name)
        assert [s["name"] for s in vm["snapshots"]] == [FOREIGN_SNAPSHOT]
        assert no_canary_on(lab, lab.free) == []
    finally:
        lab.client(lab.free).vimcmd(["vmsvc/snapshot.removeall", vmid])
    ledger.count("hostile_inputs")


def test_saved_plans_and_key_files(
    env: Env, secret_scan: SecretScan, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saved plan holds no secret (the scan at the end of the suite reads it); the files holding a
    key the tool writes — the repository's key files and an exported key — are readable by their owner
    only, whatever the umask."""
    plan = env.root / "plans" / "plan.json"
    plan.parent.mkdir()
    assert env.cli("plan", "--out", str(plan)) in (0, 2), capsys.readouterr()
    capsys.readouterr()
    secret_scan.directory(plan.parent, "saved plans")
    os.umask(old := os.umask(0o022))
    try:
        exported = env.root / "key-export" / "r.key"
        exported.parent.mkdir()
        assert env.cli("repo", "key-export", "r", "--out", str(exported)) == 0, capsys.readouterr()
        capsys.readouterr()
    finally:
        os.umask(old)
    secret_scan.directory(exported, "exported key")
    keys = sorted((env.root / "repo" / "keys").glob("*.json"))
    assert keys and private_files([*keys, exported]) == []
