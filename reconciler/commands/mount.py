"""``esxi-reconciler mount``: the restore points of a repository as a read-only FUSE filesystem."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    fail,
    load_desired,
    plural,
    state_dir,
    unknown_name,
)
from reconciler.printable import printable

if TYPE_CHECKING:
    from reconciler.facts.points import RestorePoint
    from reconciler.operations.files import FilesSession
    from reconciler.operations.guestfiles import GuestFiles

log = structlog.get_logger("reconciler.cli")

_EXAMPLES = """\
examples:
  mkdir /mnt/backup && esxi-reconciler mount /mnt/backup
                                            the repository (the only one configured) until Ctrl-C
  esxi-reconciler mount --repository offsite /mnt/backup &
  ls /mnt/backup/vms/web01/latest/          web01.vmx web01.nvram web01.img web01_1.img
  fdisk -l /mnt/backup/vms/web01/latest/web01.img
  umount /mnt/backup                        (or Ctrl-C / SIGTERM on the mount process)
  esxi-reconciler mount --files /mnt/backup &              (as root: the guests' files too)
  ls /mnt/backup/vms/web01/latest/files/    README.txt sda1 sdb1
  cp -a /mnt/backup/vms/web01/20240501T020000123456Z-ab12cd34/files/sda1/etc/fstab /tmp/

Layout: vms/<vm>/<point id>/ with the .vmx, the .nvram and each disk as a raw image of its full
size (read on demand from the repository: only what is read is fetched and decrypted; holes read
as zeros), and vms/<vm>/latest pointing to the newest point. <vm> is the VM's name, or
<name>@<host> when VMs of that name were backed up on several hosts. Everything is read-only.
`esxi-reconciler files` copies single files out of a guest's filesystems.

--files adds vms/<vm>/<point>/files/ to each point: one directory per filesystem of the guest
(sda1, sdb1 ... as `files` names them) with the guest's tree, modes, owners, times and symlinks
(shown as links, never followed by the mount), and README.txt listing every partition and why one
is not browsable (swap, LVM, unknown). Nothing is set up until a files/ directory is entered; then
the point's filesystems are mounted read-only exactly as `files` does it (read-only loop devices,
no journal replayed) below the state directory. At most 4 points are open at once (the least
recently used idle one is released first; a point with open files is not, a fifth is EBUSY); a
point that cannot be mounted is EIO with the reason on stderr. Everything is released when the
mount ends; a mount killed outright is cleaned up by the next `mount --files` or `files`. As root.

The repository stays share-locked while mounted: backups run, garbage collection waits.

Exit 0 unmounted cleanly; 1 failed (FUSE missing, wrong passphrase ...); 64 the mount point is
missing, not a directory or not empty, an unknown repository, or --files without root.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "mount",
        help="browse the restore points as a read-only filesystem (FUSE)",
        description="Mount a repository read-only with FUSE: each restore point a directory with its .vmx,"
        " .nvram and each disk as a raw image, read on demand. Runs in the foreground until unmounted,"
        " Ctrl-C or SIGTERM.",
        epilog=_EXAMPLES,
        handler=cmd_mount,
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="an existing empty directory")
    parser.add_argument("--repository", metavar="R", help="repository (default: the only one configured)")
    parser.add_argument(
        "--allow-other", action="store_true", help="let other users read the mount (FUSE allow_other)"
    )
    parser.add_argument(
        "--files",
        action="store_true",
        help="also browse the guests' filesystems: vms/<vm>/<point>/files/sda1/... (as root)",
    )
    # internal, for `files`: one point only, and the unreadable chunks written to a file
    parser.add_argument("--only-point", metavar="ID", help=argparse.SUPPRESS)
    parser.add_argument("--error-file", metavar="PATH", type=Path, help=argparse.SUPPRESS)


def choose_repository(args: argparse.Namespace, command: str) -> str:
    """``--repository``, else the only repository of the config."""
    desired = load_desired(args)
    if args.repository:
        if args.repository not in desired.repositories:
            unknown_name(command, "Repository", args.repository, sorted(desired.repositories))
        return str(args.repository)
    if len(desired.repositories) != 1:
        names = ", ".join(sorted(desired.repositories)) or "none"
        fail(
            f"{len(desired.repositories)} repositories are configured ({names});"
            " choose one with --repository",
            "ambiguous",
            "usage",
        )
    return next(iter(desired.repositories))


def serve_point_command(args: argparse.Namespace, repository: str, point_id: str) -> list[str]:
    """The command of the child that serves one point's disk images for ``files`` and ``mount --files``:
    this program with the caller's config and state options, ``mount --only-point``."""
    from reconciler.operations.files import python_cli

    argv = python_cli()
    if args.config is not None:
        argv += ["--config", str(args.config)]
    argv += ["--state-dir", str(state_dir(args)), "--log-format", "json"]
    return [*argv, "mount", "--repository", repository, "--only-point", point_id]


def _guest_files(args: argparse.Namespace, repository: str) -> GuestFiles:
    """The ``files/`` directories of ``--files``, after releasing what a killed run left."""
    from reconciler.operations.files import clean_stale_sessions, serve_command, start_point_files
    from reconciler.operations.guestfiles import GuestFiles, SessionPool

    sessions = state_dir(args).resolve() / "files"
    if sessions.is_dir():
        clean_stale_sessions(sessions)

    def start(point: RestorePoint) -> FilesSession:
        command = serve_command(serve_point_command(args, repository, point.id))
        return start_point_files(point, state_dir(args), command)

    return GuestFiles(SessionPool(start))


def cmd_mount(args: argparse.Namespace) -> int:
    """0 unmounted; 1 failed; 64 bad mount point or repository."""
    from reconciler.operations.failures import explain
    from reconciler.operations.mount import build_tree, check_mountpoint, serve
    from reconciler.operations.repositories import open_repository
    from reconciler.operations.restore import RestoreError
    from reconciler.repository import RepositoryError

    try:
        check_mountpoint(args.mountpoint)
    except RestoreError as exc:
        fail(str(exc), "bad-mountpoint", "usage")
    if args.files and args.only_point:
        fail("--files and --only-point do not go together", "usage", "usage")
    if args.files and os.geteuid() != 0:
        fail("--files mounts loop devices and the guests' filesystems: run mount as root", "usage", "usage")
    name = choose_repository(args, "mount")
    desired = load_desired(args)
    repo = open_repository(desired.repositories[name])
    errors = args.error_file

    def on_error(message: str) -> None:
        if errors is not None:
            with errors.open("a", encoding="utf-8") as f:
                f.write(message.replace("\n", " ") + "\n")

    with repo.lock(purpose=f"mount on {args.mountpoint}"):
        if args.only_point:
            try:
                points = [repo.read_point(args.only_point)]
            except (RepositoryError, ValueError, OSError) as exc:
                explained = explain(exc)
                fail(f"restore point {args.only_point}: {explained or exc}", "no-point", "usage")
        else:
            points = repo.list_points()
        tree = build_tree(points, successful_only=not args.only_point, guest_files=args.files)
        guest = _guest_files(args, name) if args.files else None
        print(
            printable(
                f"mounting repository {name} on {args.mountpoint}: {plural(len(tree.vms), 'VM')},"
                f" {plural(tree.points, 'restore point')}"
                + (", the guests' filesystems in each point's files/" if args.files else "")
                + f"; Ctrl-C or `umount {args.mountpoint}` to stop"
            ),
            flush=True,
        )
        try:
            serve(repo, tree, args.mountpoint, on_error=on_error, allow_other=args.allow_other, guest=guest)
        except RestoreError as exc:
            fail(str(exc), "mount-failed")
    log.info("mount.unmounted", mountpoint=str(args.mountpoint))
    print(printable(f"unmounted {args.mountpoint}"))
    return ExitCode.OK
