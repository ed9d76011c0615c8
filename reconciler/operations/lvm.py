"""The I/O half of LVM in file-level restore (the deciding half is :mod:`reconciler.facts.lvm`).

- :func:`read_metadata`: lvm2's ``pvck --dump metadata`` copies a volume group's text metadata out of a
  plain file holding the head of a physical volume (label and first metadata area), with a private
  ``LVM_SYSTEM_DIR``: the host's ``/etc/lvm`` (config, archive, backup, devices file) and ``/run/lvm``
  are neither read nor written, nothing is activated, and no block device ever carries the guest's PV
  label (udev on the host would autoactivate a volume group it sees on one; a guest's ``ubuntu-vg``
  clashes with the host's own).
- :class:`ComposedVolumes`: a read-only FUSE filesystem (run as its own process, see
  :func:`serve_volumes_main`) of one image file per logical volume of several pieces, each read from
  the point's disk images at the offsets the metadata gives; a loop device then goes over the file, as
  over a partition.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from reconciler.facts.lvm import Piece, pieces_in_range

PVCK = "pvck"
_LVM_CONF = """\
# esxi-reconciler: read a guest's LVM metadata, never touch the host's LVM state
config {{ checks = 1 }}
devices {{
    use_devicesfile = 0
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    hints = "none"
    scan_lvs = 0
}}
global {{
    use_lvmlockd = 0
    event_activation = 0
    locking_dir = "{root}/lock"
    notify_dbus = 0
}}
backup {{
    backup = 0
    archive = 0
    backup_dir = "{root}/backup"
    archive_dir = "{root}/archive"
}}
activation {{
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}}
"""


class LvmToolError(RuntimeError):
    """lvm2's tools are missing or could not read the metadata; the message says which."""


def lvm_tools_missing() -> str | None:
    """Why LVM volumes cannot be read on this machine, or ``None`` when they can."""
    if shutil.which(PVCK) is None:
        return "the lvm2 tools are not installed here (apt install lvm2)"
    return None


def _private_system_dir(workdir: Path) -> Path:
    root = workdir / "lvm-system"
    if not (root / "lvm.conf").exists():
        root.mkdir(mode=0o700, exist_ok=True)
        (root / "lvm.conf").write_text(_LVM_CONF.format(root=root))
    return root


def read_metadata(head: Path, workdir: Path) -> str | None:
    """The volume group's metadata text in the PV head file ``head``; ``None`` when the PV holds no
    metadata area (``pvmetadatacopies 0``: another PV of its group has it)."""
    system_dir = _private_system_dir(workdir)
    out = head.with_suffix(".vg")
    out.unlink(missing_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LVM_SYSTEM_DIR": str(system_dir),
        "LVM_SUPPRESS_FD_WARNINGS": "1",
        "LC_ALL": "C",
    }
    try:
        result = subprocess.run(
            [PVCK, "--dump", "metadata", "--file", str(out), str(head)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
    except FileNotFoundError:
        raise LvmToolError("the lvm2 tools are not installed here (apt install lvm2)") from None
    except subprocess.TimeoutExpired:
        raise LvmToolError("pvck did not finish within 60 s") from None
    if result.returncode != 0:
        said = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        raise LvmToolError(f"pvck failed: {said[-1] if said else f'exit {result.returncode}'}")
    if not out.exists():
        return None
    return out.read_text(encoding="utf-8", errors="replace")


# -- composed volume images ----------------------------------------------------------------------


def write_spec(path: Path, files: dict[str, tuple[int, list[tuple[str, int, int]]]]) -> None:
    """The spec :func:`serve_volumes_main` serves: file name → (size, [(source image, offset, length)])."""
    path.write_text(
        json.dumps({name: {"size": size, "pieces": pieces} for name, (size, pieces) in files.items()})
    )


class ComposedVolumes:
    """FUSE operations (mfusepy): ``<name>.img`` files whose bytes are pieces of other files."""

    use_ns = True

    def __init__(self, spec: dict[str, Any]) -> None:
        self.files: dict[str, tuple[int, tuple[Piece, ...]]] = {
            name: (int(body["size"]), tuple(Piece(str(p[0]), int(p[1]), int(p[2])) for p in body["pieces"]))
            for name, body in spec.items()
        }
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        sources = [p.disk for _, pieces in self.files.values() for p in pieces]
        self._time = Path(sources[0]).stat().st_mtime_ns if sources else 0

    def _file(self, path: str) -> tuple[int, tuple[Piece, ...]]:
        found = self.files.get(path.lstrip("/"))
        if found is None:
            raise _fuse_error(errno.ENOENT)
        return found

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == "/":
            mode, size, nlink = stat.S_IFDIR | 0o555, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o444, self._file(path)[0], 1
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
            "st_mtime": self._time,
            "st_ctime": self._time,
            "st_atime": self._time,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise _fuse_error(errno.ENOTDIR)
        return [".", "..", *self.files]

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise _fuse_error(errno.EROFS)
        self._file(path)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        total, pieces = self._file(path)
        out = []
        for piece in pieces_in_range(pieces, offset, min(size, max(total - offset, 0))):
            try:
                data = os.pread(self._source(piece.disk), piece.length, piece.offset)
            except OSError as exc:
                raise _fuse_error(exc.errno or errno.EIO) from exc
            out.append(data + bytes(piece.length - len(data)))  # past a source's end: zeros
        return b"".join(out)

    def _source(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 1 << 20, "f_frsize": 1 << 20, "f_namemax": 255}

    def destroy(self, path: str) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _fuse_error(code: int) -> Exception:
    import mfusepy

    error: Exception = mfusepy.FuseOSError(code)
    return error


def serve_volumes_main(argv: list[str]) -> int:
    """``SPEC MOUNTPOINT``: serve the composed volume images until unmounted (or SIGTERM)."""
    spec_path, mountpoint = argv
    import mfusepy

    operations = ComposedVolumes(json.loads(Path(spec_path).read_text()))
    try:
        mfusepy.FUSE(operations, mountpoint, foreground=True, ro=True, fsname="esxi-reconciler-lvm")
    except RuntimeError as exc:
        print(f"cannot mount {mountpoint}: {exc}", file=sys.stderr)
        return 1
    finally:
        operations.destroy("/")
    return 0


def serve_volumes_argv(spec: Path, mountpoint: Path) -> list[str]:
    """The composing child's command: this interpreter, this package."""
    code = (
        "import sys; from reconciler.operations.lvm import serve_volumes_main;"
        " sys.exit(serve_volumes_main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, str(spec), str(mountpoint)]
