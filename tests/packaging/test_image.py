"""The container image as a NAS user runs it, against the lab.

podman cannot start containers on this machine (crun's setrlimit is refused inside the CI sandbox),
so the image is run the way a container runtime would run it, by hand: its docker-archive (what
Synology Container Manager and QNAP Container Station import) is unpacked, and each command runs
chrooted into that root in a mount namespace of its own (``unshare --mount``), with the volumes
bind-mounted, the image's User, Env, WorkingDir and Entrypoint, and the host's network. The
HEALTHCHECK command is run the same way while the daemon (the image's default command) runs.

A second build of the same package with the same SOURCE_DATE_EPOCH must give the same root file system
and OCI image digest, and a docker-format config that differs only in buildah's build container id.
``make test-packaging`` runs it (slow: a package build and two image builds, about 8 minutes)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from esxisim.handle import LabHandle
from tests.packaging.build import REPO, lab_config, make, run

pytestmark = [pytest.mark.lab, pytest.mark.timeout(3600)]

CONFIG, STATE, REPOSITORY, SECRETS = (
    "/etc/esxi-reconciler/config.d",
    "/var/lib/esxi-reconciler",
    "/srv/backups/esxi",
    "/run/secrets",
)


@dataclass
class Image:
    build: Path
    root: Path
    config: dict[str, Any]

    def digests(self) -> dict[str, str]:
        lines = (self.build / "digests.txt").read_text().splitlines()
        return dict(line.split(" ", 1) for line in lines)

    @property
    def user(self) -> str:
        return str(self.config["User"])

    def command(
        self, args: list[str], volumes: Mapping[Path, str], entrypoint: list[str] | None = None
    ) -> list[str]:
        """The argv that runs ``args`` in the unpacked image as ``docker run -v host:path ... image args``
        would."""
        mounts = "".join(
            f"mkdir -p {shlex.quote(str(self.root) + path)} && mount --bind {shlex.quote(str(host))} "
            f"{shlex.quote(str(self.root) + path)} && "
            for host, path in volumes.items()
        )
        env = [str(e) for e in self.config["Env"]]
        program = entrypoint if entrypoint is not None else [str(a) for a in self.config["Entrypoint"]]
        inner = [
            "chroot",
            f"--userspec={self.user}",
            str(self.root),
            "/usr/bin/env",
            "-i",
            "-C",
            str(self.config["WorkingDir"]),
            *env,
            "HOME=/var/lib/esxi-reconciler",
            *program,
            *args,
        ]
        script = (
            f"mount --rbind /proc {shlex.quote(str(self.root / 'proc'))} && {mounts}exec {shlex.join(inner)}"
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def run(
        self, args: list[str], volumes: Mapping[Path, str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.command(args, volumes), check=check, timeout=600)


def member_json(tar: tarfile.TarFile, name: str) -> Any:
    member = tar.extractfile(name)
    assert member is not None, name
    return json.load(member)


def unpack(archive: Path, root: Path) -> dict[str, Any]:
    """Unpack a docker-archive's one layer into ``root``; returns the image's container config."""
    with tarfile.open(archive) as tar:
        manifest = member_json(tar, "manifest.json")
        assert len(manifest) == 1 and len(manifest[0]["Layers"]) == 1, manifest
        config: dict[str, Any] = member_json(tar, manifest[0]["Config"])["config"]
    root.mkdir()
    layer, into = shlex.quote(manifest[0]["Layers"][0]), shlex.quote(str(root))
    run("sh", "-c", f"tar -xOf {shlex.quote(str(archive))} {layer} | tar --numeric-owner -xf - -C {into}")
    return config


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    base = tmp_path_factory.mktemp("image")
    make("image", f"DEB_BUILD={base / 'deb'}", f"IMAGE_BUILD={base / 'build'}")
    yield Image(
        base / "build", base / "root", unpack(base / "build/esxi-reconciler.docker.tar", base / "root")
    )


def test_image_runs_as_a_non_root_user_with_volumes_and_a_health_check(image: Image) -> None:
    cfg = image.config
    uid, gid = image.user.split(":")
    assert int(uid) != 0 and int(gid) != 0
    assert set(cfg["Volumes"]) == {CONFIG, STATE, REPOSITORY}
    assert cfg["Entrypoint"] == ["/usr/bin/esxi-reconciler"] and cfg["Cmd"] == ["run"]
    assert f"CREDENTIALS_DIRECTORY={SECRETS}" in cfg["Env"]
    assert cfg["Healthcheck"]["Test"] == ["CMD", "/usr/bin/esxi-reconciler", "status"]
    for volume in (STATE, REPOSITORY):  # a named volume starts with the image's owner and mode
        st = os.stat(str(image.root) + volume)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (int(uid), int(gid), 0o700), volume
    version = image.run(["--version"], {})
    assert version.stdout == "esxi-reconciler 0.1.0\n"


def test_validate_plan_backup_status_against_the_lab(image: Image, lab: LabHandle, tmp_path: Path) -> None:
    staged = lab_config(lab, tmp_path / "stage", secrets=SECRETS, repo=REPOSITORY)
    for doc in staged["config"].rglob("*.yaml"):  # secrets as compose gives them: /run/secrets/NAME
        doc.write_text(re.sub(r"\{file: /run/secrets/([^}]+)\}", r"{credential: \1}", doc.read_text()))
    state = tmp_path / "state"
    state.mkdir()
    uid, gid = (int(n) for n in image.user.split(":"))
    for path in (staged["secrets"], staged["repo"], state, *staged["secrets"].iterdir()):
        os.chown(path, uid, gid)  # as a NAS user gives the container's user its folders
    # the secret files, read-only at /run/secrets like compose's secrets, named by {credential: NAME}
    volumes = {staged["config"]: CONFIG, state: STATE, staged["repo"]: REPOSITORY, staged["secrets"]: SECRETS}

    valid = image.run(["validate"], volumes)
    assert valid.stdout.startswith("OK: 2 hosts, 1 repository"), valid.stdout
    image.run(["repo", "init", "r"], volumes)
    plan = image.run(["plan"], volumes)
    assert "web01" in plan.stdout, plan.stdout
    backup = image.run(["backup", "p"], volumes)
    assert "web01" in backup.stdout, backup.stdout
    assert list(staged["repo"].rglob("*")), "the backup wrote nothing into the repository volume"

    # the image's default command is the daemon; its HEALTHCHECK turns healthy once a cycle is recorded
    health = [str(a) for a in image.config["Healthcheck"]["Test"][1:]]
    daemon = subprocess.Popen(
        image.command([str(a) for a in image.config["Cmd"]], volumes),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            check = run(
                *image.command([], {state: STATE, staged["config"]: CONFIG}, entrypoint=health), check=False
            )
            if check.returncode == 0:
                break
            assert daemon.poll() is None, daemon.communicate()
            assert time.monotonic() < deadline, check.stdout + check.stderr
            time.sleep(2)
        assert "web01" in check.stdout, check.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=180)
    assert daemon.returncode == 0, err[-3000:]
    points = image.run(["points"], volumes)
    assert "web01" in points.stdout, points.stdout
    # with the daemon gone the health check fails, so the NAS shows the container unhealthy
    stopped = run(
        *image.command([], {state: STATE, staged["config"]: CONFIG}, entrypoint=health), check=False
    )
    assert stopped.returncode == 1 and "daemon-not-running" in stopped.stdout + stopped.stderr, stopped


def test_a_second_build_gives_the_same_image(image: Image, tmp_path: Path) -> None:
    deb = next((image.build.parent / "deb").glob("*.deb"))
    changelog = image.build.parent / "deb/src/debian/changelog"
    epoch = run("dpkg-parsechangelog", "-l", str(changelog), "-S", "Timestamp").stdout.strip()
    again = tmp_path / "again"
    run(
        str(REPO / "packaging/image.sh"), str(deb), str(again), env={**os.environ, "SOURCE_DATE_EPOCH": epoch}
    )
    first, second = image.digests(), Image(again, image.root, image.config).digests()
    assert first["rootfs-sha256"] == second["rootfs-sha256"]
    assert first["oci-manifest"] == second["oci-manifest"]
    # the docker-format config differs only in the id of buildah's (random) build container
    configs = [docker_config(build / "esxi-reconciler.docker.tar") for build in (image.build, again)]
    for config in configs:
        assert len(config.pop("container")) == 64
    assert configs[0] == configs[1]


def docker_config(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        config: dict[str, Any] = member_json(tar, member_json(tar, "manifest.json")[0]["Config"])
        return config
