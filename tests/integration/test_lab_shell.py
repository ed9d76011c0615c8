"""The lab's SSH side: OpenSSH and paramiko logins, the ESXi-like shell, and the isolation of its root."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from esxisim.handle import LabHandle

pytestmark = pytest.mark.lab


def test_openssh_client_with_key_sees_the_datastore(lab: LabHandle) -> None:
    ssh = lab.host(lab.free)["ssh"]
    res = subprocess.run(
        [
            "ssh", "-p", str(ssh["port"]), "-i", ssh["private_key"],
            "-o", f"UserKnownHostsFile={ssh['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            f"root@{ssh['host']}", "ls /vmfs/volumes/datastore1/web01/",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert {"web01.vmx", "web01.vmdk", "web01-flat.vmdk", "web01.nvram", "web01.vmsd"} <= set(
        res.stdout.split()
    )


def test_password_login_and_the_shell_tools(lab: LabHandle) -> None:
    for host in (lab.free, lab.licensed):
        client = lab.connect_ssh(host, password=True)
        try:
            key = client.get_transport().get_remote_server_key()  # type: ignore[union-attr]
            assert key.get_name() == lab.host(host)["ssh"]["host_key_type"] == "ecdsa-sha2-nistp256"
            _, out, _ = client.exec_command(
                "python -c 'import sys;print(sys.version)'; command -v dd sha1sum vim-cmd vmkfstools; "
                "echo PATH=$PATH; df -k /tmp | tail -1"
            )
            lines = out.read().decode().splitlines()
        finally:
            client.close()
        assert lines[0].startswith("3.")
        assert lines[1:5] == [
            "/usr/bin/dd",
            "/usr/bin/sha1sum",
            "/opt/esxisim/bin/vim-cmd",
            "/opt/esxisim/bin/vmkfstools",
        ]
        assert lines[5] == "PATH=/opt/esxisim/bin:/usr/bin:/bin"
        assert int(lines[6].split()[1]) <= 512 * 1024  # /tmp is a small ramdisk


def test_the_root_is_private(lab: LabHandle) -> None:
    inside = lab.run(lab.free, "grep '^root:' /etc/shadow; touch /etc/esxisim-probe; ls -l /vmfs/volumes/")
    root_inside = inside.text.splitlines()[0]
    assert root_inside.split(":")[1].startswith("$6$")
    assert root_inside not in Path("/etc/shadow").read_text()
    assert b"Read-only file system" in inside.stderr
    assert not Path("/etc/esxisim-probe").exists()
    assert "datastore1 -> " in inside.text
    assert not Path("/vmfs").exists()
    other = lab.run(lab.licensed, "ls /vmfs/volumes/datastore1/").text.split()
    assert "app201" in other and "web01" not in other
