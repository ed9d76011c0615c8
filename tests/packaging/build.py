"""Building and running what the packaging tests check: ``make deb``/``make image`` into a test's own
directory, a throwaway Debian 12 root made with mmdebstrap, and the lab config placed inside it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from esxisim.handle import LabHandle
from tests.integration.labconfig import policy_yaml, write_lab_config

REPO = Path(__file__).resolve().parents[2]
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
USER = "esxi-reconciler"


def run(
    *args: str, timeout: float = 1200, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check:
        assert done.returncode == 0, (
            f"{args}: exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done  # type: ignore[no-any-return]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return run("make", "--no-print-directory", "-C", str(REPO), *args)


def build_deb(out: Path, version: str = "") -> Path:
    """``make deb`` into ``out`` (lintian runs as part of it and fails the build on a warning)."""
    make("deb", f"DEB_BUILD={out}", *([f"DEB_VERSION={version}"] if version else []))
    debs = sorted(out.glob("*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@contextmanager
def debian_root(path: Path) -> Iterator[Path]:
    """A minimal Debian 12 root (mmdebstrap minbase, with apt and its package lists, as on a fresh
    machine) with /proc mounted; unmounted and removed afterwards."""
    run("mmdebstrap", "--variant=minbase", "--mode=root", "--skip=cleanup/apt", "bookworm", str(path))
    run("mount", "--bind", "/proc", str(path / "proc"))
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path / "proc")], check=False)
        shutil.rmtree(path, ignore_errors=True)


def in_root(
    root: Path,
    *args: str,
    user: str = "",
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run a command chrooted into ``root`` (as ``user`` if given), with a clean environment."""
    spec = [f"--userspec={user}:{user}"] if user else []
    return run(
        "chroot", *spec, str(root), *args, check=check, env={**CLEAN_ENV, **(env or {})}, timeout=timeout
    )


def lab_config(
    lab: LabHandle, staging: Path, *, secrets: str, repo: str, vm: str = "web01"
) -> dict[str, Path]:
    """The lab config (both hosts, encrypted repository ``r``, policy ``p`` backing up ``vm`` of the
    free host) written by :func:`write_lab_config` under ``staging``, with the paths of its secrets and
    repository rewritten to where they will be seen (inside the chroot or the container). Returns the
    staged config, secrets and repository directories."""
    cfg = write_lab_config(lab, staging, policy_yaml("p", lab.free, [vm]))
    for doc in cfg.rglob("*.yaml"):
        text = doc.read_text().replace(str(staging / "secrets"), secrets).replace(str(staging / "repo"), repo)
        doc.write_text(text)
    (staging / "repo").mkdir()
    return {"config": cfg, "secrets": staging / "secrets", "repo": staging / "repo"}
