"""Build a simulated host's shell root in a private mount namespace, chroot into it and exec sshd.

Started as ``unshare --mount --propagation private -- python -m esxisim.nsroot HOSTDIR``: every mount
made here lives only in the new namespace and vanishes with its last process, so nothing outside
changes (no ``/vmfs`` on the real root, the real ``/etc/shadow`` untouched). The root is a tmpfs on
``HOSTDIR/root`` holding::

    /usr /etc /sys                 read-only binds of the real ones (/proc and /dev bound as they are)
    /bin /sbin /lib /lib64         symlinks into usr, as on Debian
    /etc/ssh                       HOSTDIR/ssh, read-only (sshd_config, host keys, authorized_keys)
    /etc/shadow                    HOSTDIR/ssh/shadow, read-only: root has the host's password
    /root                          a private home (ESXi root has no dotfiles worth inheriting)
    /tmp                           a small tmpfs, like ESXi's ramdisk
    /run                           tmpfs with /run/sshd and /run/esxisim = HOSTDIR/run (control.sock)
    /var                           empty log/tmp dirs
    /vmfs/volumes/<uuid>           read-write binds of the datastore directories, and
    /vmfs/volumes/<ds> -> <uuid>   a symlink per name, as on ESXi (a plain bind if no UUID is known)
    /opt/esxisim/bin               the tools (vim-cmd, vmkfstools, python), read-only

The process then chroots and execs ``/usr/sbin/sshd -D -e -f /etc/ssh/sshd_config``: its pid stays the
pid that the launcher started, so the launcher can find every process of this host by its namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

TMP_SIZE = "256m"
SSHD = "/usr/sbin/sshd"
SSHD_CONFIG = "/etc/ssh/sshd_config"
TOOLS_MOUNT = "/opt/esxisim/bin"
CONTROL_MOUNT = "/run/esxisim"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NsRootError(RuntimeError):
    """The root could not be built."""


def mount(source: str | None, target: Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2), raising OSError with the target in the message."""
    rc = _libc.mount(
        None if source is None else os.fsencode(source),
        os.fsencode(str(target)),
        None if fstype is None else fstype.encode(),
        ctypes.c_ulong(flags),
        None if data is None else data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source: str | Path, target: Path, *, readonly: bool, recursive: bool = False) -> None:
    """Bind ``source`` on ``target`` (creating the mount point), then make it read-only if asked."""
    src = Path(source)
    if src.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
    mount(str(src), target, None, MS_BIND | (MS_REC if recursive else 0))
    if readonly:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def tmpfs(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)


def datastores(host_dir: Path) -> list[tuple[str, Path, str | None]]:
    """(name, directory, uuid-or-None) of each datastore: volumes.json (written by the launcher from
    the host process's state, with the UUIDs) or else sim.json."""
    volumes = host_dir / "volumes.json"
    entries = json.loads(volumes.read_text()) if volumes.exists() else None
    if entries is None:
        entries = json.loads((host_dir / "sim.json").read_text()).get("datastores", [])
    return [(str(ds["name"]), Path(ds["path"]), ds.get("uuid") or None) for ds in entries]


def build_root(host_dir: Path, tools_dir: Path) -> Path:
    """Mount the host's root under ``host_dir/root`` (in the current mount namespace) and return it."""
    root = host_dir / "root"
    ssh_dir = host_dir / "ssh"
    mount(None, Path("/"), None, MS_REC | MS_PRIVATE)
    tmpfs(root, "size=16m,mode=755")
    for name in ("bin", "sbin", "lib", "lib64"):
        real = Path("/") / name
        if real.is_symlink():
            (root / name).symlink_to(real.readlink())
    bind("/usr", root / "usr", readonly=True)
    bind("/etc", root / "etc", readonly=True)
    bind(ssh_dir, root / "etc/ssh", readonly=True)
    bind(ssh_dir / "shadow", root / "etc/shadow", readonly=True)
    bind("/dev", root / "dev", readonly=False, recursive=True)
    bind("/proc", root / "proc", readonly=False, recursive=True)
    bind("/sys", root / "sys", readonly=True, recursive=True)
    home = root / "root"
    home.mkdir(mode=0o700)
    (home / ".profile").write_text(
        "# esxisim: login shells get the ESXi-like PATH back after /etc/profile\n"
        f"PATH={TOOLS_MOUNT}:/usr/bin:/bin:/usr/sbin:/sbin\nexport PATH\n"
    )
    tmpfs(root / "tmp", f"size={TMP_SIZE},mode=1777")
    tmpfs(root / "run", "size=8m,mode=755")
    (root / "run/sshd").mkdir(mode=0o755)
    bind(host_dir / "run", root / CONTROL_MOUNT.lstrip("/"), readonly=False)
    for sub in ("var/log", "var/tmp", "var/lib"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "var/tmp").chmod(0o1777)
    (root / "var/run").symlink_to("/run")
    volumes = root / "vmfs/volumes"
    volumes.mkdir(parents=True)
    for name, path, uuid in datastores(host_dir):
        if uuid:
            bind(path, volumes / uuid, readonly=False)
            (volumes / name).symlink_to(uuid)
        else:
            bind(path, volumes / name, readonly=False)
    bind(tools_dir, root / TOOLS_MOUNT.lstrip("/"), readonly=True)
    return root


def main(argv: list[str]) -> int:  # noqa: RET503 - ends in execve
    """``python -m esxisim.nsroot HOSTDIR``: build the root, chroot, exec sshd (never returns on success)."""
    if len(argv) != 1:
        print("usage: python -m esxisim.nsroot HOSTDIR", file=sys.stderr)
        return 2
    host_dir = Path(argv[0]).resolve()
    tools_dir = Path(__file__).resolve().parent / "tools"
    try:
        root = build_root(host_dir, tools_dir)
    except OSError as exc:
        print(f"esxisim.nsroot: {exc}", file=sys.stderr)
        return 1
    os.chroot(root)
    os.chdir("/")
    env = {"PATH": f"{TOOLS_MOUNT}:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "HOME": "/root"}
    sys.stderr.flush()
    os.execve(SSHD, [SSHD, "-D", "-e", "-f", SSHD_CONFIG], env)  # noqa: S606 - argv, no shell


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
