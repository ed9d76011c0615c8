"""``esxi-reconciler export``: a restore point as local files (raw images or VMDKs + .vmx)."""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    add_point_selection,
    emit_json,
    fail,
    load_desired,
)
from reconciler.printable import printable
from reconciler.units import human_size

log = structlog.get_logger("reconciler.cli")

_EXAMPLES = """\
examples:
  esxi-reconciler export web01 --to /srv/export/web01
                                            newest point: .vmx, .nvram, sparse raw images
  esxi-reconciler export web01 --point ID --to out --disk-format vmdk
                                            monolithicFlat VMDKs (qemu-img, VirtualBox, vmkfstools -i)
  esxi-reconciler export web01 --to out --disk-format stream-optimized
                                            one compressed VMDK per disk (for an OVF/OVA)
  esxi-reconciler export web01 --from-host esxi2 --to out
                                            web01 exists on esxi1 and esxi2: esxi2's
  esxi-reconciler export web01 --to /srv/share/web01 --mode 640
                                            files readable by the group too (directories 750)

The files hold the VM's disks: they are created readable and writable by you only (mode 600),
and the directories the export creates mode 700, whatever the umask; --mode says otherwise.

Exit 0 exported; 1 failed (the cause is named: wrong passphrase, volume not mounted, target
directory not writable, disk full ...); 64 a name or point that does not exist, or a bad --mode.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "export",
        help="write a restore point to local files",
        description="Write a restore point as local files: the .vmx, .nvram and each disk as a sparse raw"
        " image, a monolithicFlat or a streamOptimized VMDK. Each disk is checked by SHA-256 after writing.",
        epilog=_EXAMPLES,
        handler=cmd_export,
    )
    add_point_selection(parser)
    parser.add_argument("--to", metavar="DIR", type=Path, required=True, help="target directory")
    parser.add_argument(
        "--disk-format",
        "--format",
        dest="disk_format",
        choices=("raw", "vmdk", "stream-optimized"),
        default="raw",
        help="disk format: raw (sparse images), vmdk (monolithicFlat) or stream-optimized (compressed,"
        " for OVF/OVA); default: raw",
    )
    parser.add_argument(
        "--mode",
        metavar="MODE",
        type=_file_mode,
        default=None,
        help="octal permissions of the files written (default: 600); directories created get the same"
        " plus x where r is set (640: 750)",
    )


def _file_mode(text: str) -> int:
    """``--mode``: octal permission bits that let the owner read what is written."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 600 or 640") from None
    if not 0 <= mode <= 0o777 or not mode & 0o400:
        raise argparse.ArgumentTypeError(f"{text!r}: give permission bits (000-777) that let the owner read")
    return mode


def cmd_export(args: argparse.Namespace) -> int:
    """0 exported; 1 failed; 64 bad input."""
    from reconciler.commands.restore import describe_point, find_repository
    from reconciler.operations.export import FILE_MODE, export_point
    from reconciler.operations.failures import explain
    from reconciler.operations.repositories import open_repository
    from reconciler.operations.restore import RestoreError, describe_source, find_point

    desired = load_desired(args)
    name = find_repository(args, desired, "export")
    repo = open_repository(desired.repositories[name])
    with repo.lock(purpose=f"export of {args.vm}"):
        try:
            point = find_point(repo, args.vm, args.point, host=args.from_host)
        except RestoreError as exc:
            fail(str(exc), "no-point", "usage")
        print(describe_point(point))
        try:
            mode = args.mode if args.mode is not None else FILE_MODE
            result = export_point(repo, point, args.to, args.disk_format, mode=mode)
        except RestoreError as exc:
            fail(f"FAILED: {exc}", "export-failed")
        except OSError as exc:
            explained = explain(exc, path_is=str(args.to))
            if explained is None:
                raise
            fail(f"FAILED: {explained}", explained.code)
    print(printable(f"exported restore point {point.id} of {describe_source(point)} to {result.directory}"))
    disks = []
    for d in result.disks:
        capacity = next(p.capacity for p in point.disks if p.label == d.label)
        disks.append(
            {"label": d.label, "path": str(d.path), "data": str(d.data), "size": capacity, "sha256": d.sha256}
        )
        print(printable(f"  {d.label}: {d.path.name} ({human_size(capacity)}) sha256 {d.sha256[:16]}… ok"))
    if args.json:
        emit_json(
            {
                "ok": True,
                "repository": name,
                "point_id": point.id,
                "source": {"vm": point.vm.name, "host": point.vm.host, "uuid": point.vm.uuid},
                "directory": str(result.directory),
                "disk_format": args.disk_format,
                "files": [str(f) for f in result.files],
                "disks": disks,
            }
        )
    return ExitCode.OK
