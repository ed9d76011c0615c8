"""VM names are data: a name holding a line break (and a tab, a CR) is planned, backed up, listed and
restored on both lab hosts (free: SSH and vim-cmd; licensed: the API and HTTPS, SSH disabled), and is
printed escaped wherever a person reads it. The remote shell gets exactly the argv the product built,
through the lab's login shell and through BusyBox ash (ESXi's ``/bin/sh``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from reconciler import cli
from reconciler.config import load_config
from reconciler.config.model import DesiredState
from reconciler.esxi import vimcmd
from reconciler.esxi.vmx import VmxFile
from reconciler.operations.hosts import connect
from reconciler.printable import printable
from reconciler.repository import KdfParams, Repository
from tests import vimcmd_listing
from tests.integration.labconfig import PASSPHRASE, policy_yaml, write_lab_config

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

MiB = 1 << 20
# Each would fake a line of the plan, of `points` or of a log if printed raw.
NL_FREE = "nl 01\n  + backup esxi1/evil -> r (first run)\tend"
NL_LIC = "nl 02\r\n  ! warning\tend"

ARGS = [
    NL_FREE,
    NL_LIC,
    "\nleading and trailing\n",
    "a\n\n'b'\n\"c\"\n\\\n$(id)\n`id`\n; reboot\n",
    'it\'s "q" $HOME * ? [a] | & > < \\',
    "tab\tesc\x1b[2J del\x7f nel\x85 ls\u2028 ファイル鯖",
    "-n",
    "",
]
ARGV_PROGRAM = "import sys,json;sys.stdout.write(json.dumps(sys.argv[1:]))"


@dataclass
class Env:
    lab: LabHandle
    config: Path
    desired: DesiredState
    state: Path

    def cli(self, *args: str, log_format: str = "json") -> int:
        return cli.main(
            ["--config", str(self.config), "--state-dir", str(self.state), "--log-format", log_format, *args]
        )


def _vms(lab: LabHandle, host: str, prefix: str) -> list[dict[str, object]]:
    return [v for v in lab.client(host).state()["vms"] if str(v["name"]).startswith(prefix)]


def _destroy(lab: LabHandle, host: str, prefix: str) -> None:
    """Remove every VM whose name starts with ``prefix`` (ours and their restored copies)."""
    for vm in _vms(lab, host, prefix):
        vmid = str(vm["vmid"])
        lab.client(host).vimcmd(["vmsvc/power.off", vmid])
        res = lab.client(host).vimcmd(["vmsvc/destroy", vmid])
        assert res.exit == 0, res


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    disks = [{"size": 16 * MiB, "fill": 0.25, "seed": 7101}, {"size": 8 * MiB, "fill": 0.5, "seed": 7102}]
    for host, name in ((lab.free, NL_FREE), (lab.licensed, NL_LIC)):
        lab.client(host).create_vm({"name": name, "disks": disks, "power": "poweredOn"})
    try:
        root = tmp_path_factory.mktemp("names")
        policies = policy_yaml("free-nl", lab.free, [NL_FREE]) + policy_yaml("lic-nl", lab.licensed, [NL_LIC])
        cfg = write_lab_config(lab, root, policies)
        host_file = cfg / "hosts" / f"{lab.licensed}.yaml"  # the licensed host through the API only
        lines = [ln for ln in host_file.read_text().splitlines() if not ln.strip().startswith("ssh:")]
        host_file.write_text("\n".join([*lines, "  ssh: {enabled: false}"]) + "\n")
        Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
        yield Env(lab, cfg, load_config(cfg), root / "state")
    finally:
        _destroy(lab, lab.free, "nl 01")
        _destroy(lab, lab.licensed, "nl 02")


# -- the shell ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["free", "licensed"])
def test_the_remote_shell_gets_the_exact_argv_also_through_busybox_ash(lab: LabHandle, which: str) -> None:
    """Line breaks stay inside their single quotes: the program on the host receives exactly the argv
    that was quoted, whether the login shell (the lab's) or BusyBox ash (a real ESXi's) reads the line."""
    from tests.integration.test_esxi_host import host_config

    with connect(host_config(lab, lab.free if which == "free" else lab.licensed)) as host:
        shell = host.shell
        assert shell is not None
        argv = ["python", "-c", ARGV_PROGRAM, *ARGS]
        assert json.loads(shell.run(argv).text) == ARGS
        ash = shell.run(["busybox", "sh", "-c", 'readlink /proc/$$/exe; echo "$0"', "ash-check"]).text
        assert ash.splitlines() == ["/usr/bin/busybox", "ash-check"]  # BusyBox itself parsed the line
        assert json.loads(shell.run(["busybox", "sh", "-c", vimcmd.command_line(argv)]).text) == ARGS
        with pytest.raises(ValueError):
            shell.run(["echo", "nul\x00"])


@pytest.mark.parametrize("api_only", [False, True])
def test_files_whose_paths_hold_line_breaks(env: Env, api_only: bool) -> None:
    """Folder and file operations on paths with line breaks: SSH on the free host, the API and HTTPS
    ``/folder`` on the licensed one."""
    lab = env.lab
    host_name = lab.licensed if api_only else lab.free
    folder = "[datastore1] names\ntest\t1"
    with connect(env.desired.host(host_name)) as host:
        assert (host.shell is None) is api_only
        host.delete_path(folder)
        try:
            host.make_directory(folder)
            assert host.folder_exists(folder)
            first, second = f"{folder}/a\nb.vmx", f"{folder}/\nc d\n.nvram"
            host.write_file(first, b"one\n")
            host.write_file(second, b"two\n")
            assert lab.local_path(host_name, first).read_bytes() == b"one\n"
            assert host.list_folder(folder) == sorted(["a\nb.vmx", "\nc d\n.nvram"])
            assert host.list_folder(folder, "*.vmx") == ["a\nb.vmx"]
            assert host.read_file(second) == b"two\n" and host.file_exists(second)
            host.move_file(second, f"{folder}/moved\n.nvram")
            assert not host.file_exists(second)
            assert host.file_sha256(f"{folder}/moved\n.nvram") == (
                "27dd8ed44a83ff94d557f9fd0412ed5a8cbca69ea04922d88c01184a07300a5a"  # sha256("two\n")
            )
        finally:
            host.delete_path(folder)
        assert not host.folder_exists(folder)


# -- end to end ----------------------------------------------------------------------------------------


def test_getallvms_lists_the_name_with_its_line_break(env: Env) -> None:
    """The free host's ``vim-cmd vmsvc/getallvms`` prints the name over two lines; the row is whole."""
    with connect(env.desired.host(env.lab.free)) as host:
        shell = host.shell
        assert shell is not None
        rows = vimcmd_listing.parse_getallvms(shell.run(vimcmd_listing.getallvms()).text)
        api = {vm.vmid: (vm.name, vm.vmx_path) for vm in host.list_vms()}
    assert {row.vmid: (row.name, row.vmx) for row in rows} == api
    assert NL_FREE in {name for name, _ in api.values()}


def _lines(text: str) -> list[str]:
    return text.split("\n")


def test_plan_backup_points_status_restore(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    lab = env.lab
    free_shown, lic_shown = printable(NL_FREE), printable(NL_LIC)
    assert "\n" not in free_shown + lic_shown and "\\n" in free_shown and "\\r\\n" in lic_shown

    # plan: one line per action, the names escaped; JSON keeps the real names
    assert env.cli("plan") == 0
    out = capsys.readouterr().out
    assert f"  + backup {lab.free}/{free_shown} -> r (first run; due since " in out
    assert f"  + backup {lab.licensed}/{lic_shown} -> r (first run; due since " in out
    assert not any(line.startswith(("  + backup esxi1/evil", "  ! warning\t")) for line in _lines(out)), out
    assert env.cli("plan", "--format", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert {a["vm"] for a in plan["actions"] if a["kind"] == "backup"} == {NL_FREE, NL_LIC}

    # one daemon cycle: both backups (CBT switched on through the API on the licensed host)
    assert env.cli("run", "--once", log_format="console") == 0
    captured = capsys.readouterr()
    assert NL_FREE not in captured.err and NL_LIC not in captured.err  # console logs escape them
    assert free_shown in captured.err
    assert env.cli("status") == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert f"{lab.free}/{free_shown}" in out and f"{lab.licensed}/{lic_shown}" in out
    assert NL_FREE not in out and "\r" not in out

    # an incremental backup by hand: the result line is escaped
    lab.client(lab.free).guest_write(NL_FREE, 5, seed=7103)
    assert env.cli("backup", "free-nl", log_format="console") == 0
    captured = capsys.readouterr()
    assert f"{free_shown}: ok digest read " in captured.out and "1 of 1 VMs backed up" in captured.out
    assert NL_FREE not in captured.out + captured.err

    # points: escaped in the table, real in JSON
    assert env.cli("points") == 0
    table = capsys.readouterr().out
    rows_shown = [line for line in _lines(table.rstrip("\n")) if not line.startswith(" ")]
    assert len(rows_shown) == 4  # header + 3 points (under each full point, its disks' reasons, indented)
    assert sum(free_shown in line for line in _lines(table)) == 2 and lic_shown in table
    assert env.cli("points", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["vm"] for r in rows) == sorted([NL_FREE, NL_FREE, NL_LIC])
    assert all(r["status"] == "success" for r in rows)

    # restore as a new VM under the default name: the folder has no control character, the display name
    # keeps them; a name that matches nothing is refused in one escaped line
    for host_name, name, shown in ((lab.free, NL_FREE, free_shown), (lab.licensed, NL_LIC, lic_shown)):
        assert env.cli("restore", name, log_format="console") == 0, capsys.readouterr()
        captured = capsys.readouterr()
        assert f"of VM '{shown}' from {host_name} (uuid " in captured.out
        m = re.search(r"restored as new VM '(.*)' \(vmid (\d+)\) at (\[datastore1\] .*\.vmx)\n", captured.out)
        assert m is not None, captured.out
        assert m.group(1).startswith(shown + "-restored-")
        assert "\r" not in captured.out and name not in captured.out + captured.err
        with connect(env.desired.host(host_name)) as host:
            copy = host.vm(m.group(2))
            assert copy.name.startswith(name + "-restored-") and copy.vmx_path == m.group(3)
            assert re.fullmatch(r"\[datastore1\] [^\x00-\x1f/]+/[^\x00-\x1f/]+\.vmx", copy.vmx_path)
            vmx = VmxFile.parse(lab.local_path(host_name, copy.vmx_path).read_text(encoding="utf-8"))
            assert vmx.get("displayName") == copy.name
    assert env.cli("restore", "nl 01\nnothing") == 1
    err = capsys.readouterr().err
    assert err == (
        "esxi-reconciler restore: no repository has restore points of VM 'nl 01\\nnothing'"
        " (`esxi-reconciler points` lists them)\n"
    )
