"""The Debian package as an admin meets it, in a throwaway Debian 12 root (mmdebstrap, chroot): ``apt
install ./esxi-reconciler_*.deb`` pulls the Debian dependencies; the program runs; the directories
belong to the right users; the systemd unit's ExecStart= command line, run as the unit runs it (its
User=, Environment= and StateDirectory=), backs up a VM of the lab; an upgrade to a rebuilt package of
a higher version keeps the config and the state; remove keeps them too, purge removes them.

``make test-packaging`` runs it (slow: two package builds and a Debian root, about 6 minutes)."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from esxisim.handle import LabHandle
from tests.packaging.build import CLEAN_ENV, USER, build_deb, debian_root, in_root, lab_config

pytestmark = [pytest.mark.lab, pytest.mark.timeout(3600)]

UPGRADE_VERSION = "0.1.0+test1"


def owner_and_mode(root: Path, path: str) -> tuple[str, str, str]:
    """Owner, group (by the names inside the root) and mode of ``path`` in ``root``."""
    user, group, mode = in_root(root, "stat", "-c", "%U %G %a", path).stdout.split()
    return user, group, mode


def unit_command(root: Path) -> tuple[list[str], dict[str, str]]:
    """The installed unit's ExecStart= argv and its Environment= variables."""
    unit = (root / "lib/systemd/system/esxi-reconciler.service").read_text()
    exec_start = re.findall(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    env = dict(v.split("=", 1) for v in re.findall(r"^Environment=(.+)$", unit, re.MULTILINE))
    assert len(exec_start) == 1, exec_start
    return shlex.split(exec_start[0]), env


def test_install_run_upgrade_remove_purge(lab: LabHandle, tmp_path: Path) -> None:
    first = build_deb(tmp_path / "deb1")
    second = build_deb(tmp_path / "deb2", UPGRADE_VERSION)
    with debian_root(tmp_path / "root") as root:
        for deb in (first, second):
            shutil.copy(deb, root / "tmp")

        # install: apt resolves python3, python3-yaml and adduser from Debian
        in_root(root, "apt-get", "install", "-y", "--no-install-recommends", f"/tmp/{first.name}")
        assert in_root(root, "esxi-reconciler", "--version").stdout == "esxi-reconciler 0.1.0\n"
        valid = in_root(root, "esxi-reconciler", "validate", "/usr/share/esxi-reconciler/config.example")
        assert valid.stdout.startswith("OK: 2 hosts, 2 repositories"), valid.stdout
        assert "/usr/sbin/nologin" in in_root(root, "getent", "passwd", USER).stdout
        assert owner_and_mode(root, "/etc/esxi-reconciler/config.d") == ("root", USER, "750")
        assert owner_and_mode(root, "/etc/esxi-reconciler/credentials") == ("root", "root", "700")
        assert owner_and_mode(root, "/var/lib/esxi-reconciler") == (USER, USER, "700")
        for shipped in (
            "usr/share/man/man1/esxi-reconciler.1.gz",
            "usr/share/bash-completion/completions/esxi-reconciler",
            "usr/share/zsh/vendor-completions/_esxi-reconciler",
            "usr/share/esxi-reconciler/schemas/host.schema.json",
        ):
            assert (root / shipped).is_file(), shipped
        # byte code compiled at install time by dh_python3's postinst, removed again on remove
        assert list((root / "usr/lib/esxi-reconciler/reconciler").glob("__pycache__/cli.*.pyc"))

        # the lab config where the package expects it; secrets and the repository as an admin sets them up
        staged = lab_config(
            lab, tmp_path / "stage", secrets="/etc/esxi-reconciler/lab-secrets", repo="/srv/esxi-repo"
        )
        shutil.copytree(staged["config"], root / "etc/esxi-reconciler/config.d", dirs_exist_ok=True)
        shutil.copytree(staged["secrets"], root / "etc/esxi-reconciler/lab-secrets")
        (root / "srv/esxi-repo").mkdir()
        in_root(root, "chown", "-R", f"{USER}:{USER}", "/etc/esxi-reconciler/lab-secrets", "/srv/esxi-repo")
        in_root(root, "chmod", "-R", "g+rX", "/etc/esxi-reconciler/config.d")
        in_root(root, "esxi-reconciler", "repo", "init", "r", user=USER)

        # the unit's command line, as the unit runs it: one cycle backs up web01, SIGTERM stops it with 0
        argv, unit_env = unit_command(root)
        assert argv[:2] == ["/usr/bin/esxi-reconciler", "run"], argv
        env = {
            **CLEAN_ENV,
            **unit_env,
            "STATE_DIRECTORY": "/var/lib/esxi-reconciler",
            "HOME": "/var/lib/esxi-reconciler",
        }
        daemon = subprocess.Popen(
            ["chroot", f"--userspec={USER}:{USER}", str(root), *argv, "--log-format", "json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                status = in_root(root, "esxi-reconciler", "status", user=USER, env=env, check=False)
                if status.returncode == 0 and "web01" in status.stdout:
                    break
                assert daemon.poll() is None, daemon.communicate()
                assert time.monotonic() < deadline, status.stdout + status.stderr
                time.sleep(2)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=180)
        assert daemon.returncode == 0, err[-3000:]
        points = in_root(root, "esxi-reconciler", "points", user=USER, env=env)
        assert "web01" in points.stdout, points.stdout
        state = sorted(p.name for p in (root / "var/lib/esxi-reconciler").iterdir())
        assert "status.db" in state, state
        config_before = {
            p.name: p.read_bytes() for p in (root / "etc/esxi-reconciler/config.d").rglob("*.yaml")
        }

        # upgrade: the new version runs; config, credentials and state untouched
        in_root(root, "apt-get", "install", "-y", "--no-install-recommends", f"/tmp/{second.name}")
        assert in_root(root, "dpkg-query", "-W", "-f=${Version}", "esxi-reconciler").stdout == UPGRADE_VERSION
        assert {
            p.name: p.read_bytes() for p in (root / "etc/esxi-reconciler/config.d").rglob("*.yaml")
        } == config_before
        assert sorted(p.name for p in (root / "var/lib/esxi-reconciler").iterdir()) == state
        assert owner_and_mode(root, "/var/lib/esxi-reconciler") == (USER, USER, "700")
        after = in_root(root, "esxi-reconciler", "status", "--no-daemon", user=USER, env=env, check=False)
        assert "web01" in after.stdout, (
            after.stdout + after.stderr
        )  # the state written by 0.1.0, read by the new version

        # remove: the program goes, config and state stay; purge: they go too (the user stays)
        in_root(root, "apt-get", "remove", "-y", "esxi-reconciler")
        assert not (root / "usr/bin/esxi-reconciler").exists()
        assert not (root / "usr/lib/esxi-reconciler").exists()
        assert (root / "etc/esxi-reconciler/config.d/policies/p.yaml").is_file()
        assert (root / "var/lib/esxi-reconciler/status.db").is_file()
        in_root(root, "apt-get", "purge", "-y", "esxi-reconciler")
        assert not (root / "etc/esxi-reconciler").exists()
        assert not (root / "var/lib/esxi-reconciler").exists()
        assert in_root(root, "getent", "passwd", USER).returncode == 0
        assert (root / "srv/esxi-repo").is_dir()  # the repository is the admin's, never the package's
