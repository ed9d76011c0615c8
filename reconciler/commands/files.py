"""``esxi-reconciler files VM ls|cat|cp PATH``: single files out of a restore point's filesystems."""

from __future__ import annotations

import argparse
import stat
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    add_point_selection,
    emit_json,
    fail,
    load_desired,
    plural,
    state_dir,
)
from reconciler.printable import printable
from reconciler.units import human_size

log = structlog.get_logger("reconciler.cli")

_EXAMPLES = """\
examples:
  esxi-reconciler files web01 ls            the filesystems of the newest point: sda1 (ext4) ...
  esxi-reconciler files web01 ls sda1/etc -R
  esxi-reconciler files web01 cat sda1/etc/hosts
  esxi-reconciler files web01 --point ID cp sda1/home/ann/report.ods --to /tmp/restored
  esxi-reconciler files web01 --from-host esxi2 cp sdb2/Users --to /srv/restore
  esxi-reconciler files web01 cp ubuntu--vg-ubuntu--lv/etc/fstab --to /tmp/restored    (LVM)

Paths start with the filesystem: sda1 is partition 1 of the first disk (disks in the order of the
.vmx: sda, sdb ...), sdb a filesystem on a whole disk. MBR (with logical partitions) and GPT; ext2/3/4,
XFS, btrfs, FAT, exFAT and NTFS; LVM linear volumes (with lvm2 installed) named as /dev/mapper names
them: ubuntu-vg/root is ubuntu--vg-root (a '-' inside a name doubled), also when extended or spread
over several disks; nothing is activated on this machine. Each filesystem is mounted read-only (ext4
without replaying the journal, XFS without log recovery) on a read-only loop device over the point's
disk image, which is read on demand from the repository; everything is unmounted and detached
afterwards, also after Ctrl-C or SIGTERM (a run killed outright is cleaned up by the next one). Runs as root.

cp keeps modes, times, ownership (numeric ids, as in the guest) and symlinks, and never overwrites:
the copy is DIR/<name>.

Exit 0 done; 1 failed (a chunk that cannot be read, a filesystem that cannot be mounted ...);
64 an unknown VM, point, filesystem or path.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "files",
        help="list, print or copy single files out of a restore point",
        description="Browse the filesystems inside a restore point's disks and copy single files out,"
        " without restoring the VM.",
        epilog=_EXAMPLES,
        handler=cmd_files,
    )
    add_point_selection(parser)
    parser.add_argument(
        "action", choices=("ls", "cat", "cp"), help="ls: list; cat: print a file; cp: copy out"
    )
    parser.add_argument("path", metavar="PATH", nargs="?", default="/", help="sda1/etc/hosts; default /")
    parser.add_argument("--to", metavar="DIR", type=Path, help="cp: the directory to copy into")
    parser.add_argument("-R", "--recursive", action="store_true", help="ls: the whole tree below PATH")


def cmd_files(args: argparse.Namespace) -> int:
    """0 done; 1 failed; 64 bad input."""
    from reconciler.commands.mount import serve_point_command
    from reconciler.commands.restore import describe_point, find_repository
    from reconciler.operations.files import BadPath, FilesError, open_point_files, serve_command
    from reconciler.operations.repositories import open_repository
    from reconciler.operations.restore import RestoreError, find_point

    if args.action == "cp" and args.to is None:
        fail("cp needs --to DIR, the directory to copy into", "usage", "usage")
    if args.action == "cat" and args.path in ("", "/"):
        fail("cat needs the PATH of a file, e.g. sda1/etc/hosts", "usage", "usage")
    desired = load_desired(args)
    name = find_repository(args, desired, "files")
    repo = open_repository(desired.repositories[name])
    with repo.lock(purpose=f"files of {args.vm}"):
        try:
            point = find_point(repo, args.vm, args.point, host=args.from_host)
        except RestoreError as exc:
            fail(str(exc), "no-point", "usage")
    if args.action != "cat" and not args.json:
        print(describe_point(point), flush=True)
    try:
        with open_point_files(
            point, state_dir(args), serve_command(serve_point_command(args, name, point.id))
        ) as session:
            for problem in session.problems:
                log.warning("files.problem", problem=problem)
            if args.action == "ls":
                return _ls(args, session)
            if args.action == "cat":
                from reconciler.operations.files import cat_file

                cat_file(session, args.path, sys.stdout.buffer)
                sys.stdout.buffer.flush()
                return ExitCode.OK
            return _cp(args, session)
    except FilesError as exc:
        if isinstance(exc, BadPath):
            fail(str(exc), "no-path", "usage")
        fail(str(exc), "files-failed")


def _ls(args: argparse.Namespace, session: Any) -> int:
    from reconciler.operations.files import filesystem_line, filesystem_rows, list_entries

    if args.path in ("", "/"):
        rows = filesystem_rows(session)
        if args.json:
            emit_json(
                {"ok": True, "point_id": session.point.id, "filesystems": rows, "problems": session.problems}
            )
            return ExitCode.OK
        width = max([6, *(len(str(row["name"])) for row in rows)])
        for row in rows:
            print(printable(filesystem_line(row, width)))
        for problem in session.problems:
            print(printable(f"  note: {problem}"))
        if not rows:
            print("no partitions or filesystems found")
        if args.recursive:
            for fs in session.filesystems:
                if fs.name in session.mounted:
                    _print_entries(list_entries(session, fs.name, recursive=True))
        return ExitCode.OK
    entries = list_entries(session, args.path, recursive=args.recursive)
    if args.json:
        emit_json({"ok": True, "point_id": session.point.id, "entries": [e.__dict__ for e in entries]})
        return ExitCode.OK
    _print_entries(entries)
    return ExitCode.OK


def _print_entries(entries: list[Any]) -> None:
    for e in entries:
        type_char = {"dir": "d", "symlink": "l", "file": "-"}.get(e.kind, "?")
        when = datetime.fromtimestamp(e.mtime_ns / 1e9, timezone.utc)
        link = f" -> {e.target}" if e.target is not None else ""
        print(
            printable(
                f"{type_char}{stat.filemode(e.mode)[1:]} {e.uid:>5} {e.gid:>5} {e.size:>12}"
                f" {when:%Y-%m-%d %H:%M:%S} {e.path}{link}"
            )
        )


def _cp(args: argparse.Namespace, session: Any) -> int:
    from reconciler.operations.files import copy_out

    result = copy_out(session, args.path, args.to, on_file=lambda p: log.debug("files.copy", path=p))
    if args.json:
        emit_json(
            {
                "ok": True,
                "point_id": session.point.id,
                "copied": [str(p) for p in result.copied],
                "files": result.files,
                "directories": result.directories,
                "symlinks": result.symlinks,
                "bytes": result.bytes,
                "skipped": result.skipped,
            }
        )
        return ExitCode.OK
    print(
        printable(
            f"copied {args.path} to {args.to}: {plural(result.files, 'file')}, "
            f"{plural(result.directories, 'directory', 'directories')}, {plural(result.symlinks, 'symlink')},"
            f" {human_size(result.bytes)}"
        )
    )
    for skipped in result.skipped:
        print(printable(f"  skipped (not a file, directory or symlink): {skipped}"))
    return ExitCode.OK
