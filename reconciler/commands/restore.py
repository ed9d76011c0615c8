"""``esxi-reconciler restore``: bring a VM back from a restore point (new VM, overwrite, one disk, test)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import structlog

from reconciler.commands.common import add_command, human_size, load_desired, plural
from reconciler.printable import printable

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState

log = structlog.get_logger("reconciler.cli")

_EXAMPLES = """\
examples:
  esxi-reconciler restore web01             newest point of web01 as a NEW VM beside it
                                            (web01-restored-<time>; nothing existing is touched)
  esxi-reconciler restore web01 --point 20260101T020000000000Z-1a2b3c4d --power-on
  esxi-reconciler restore web01 --overwrite
                                            put web01's disks back (asks; powers it off first)
  esxi-reconciler restore web01 --overwrite --disk "Hard disk 2" --yes
                                            only the data disk, no question
  esxi-reconciler restore web01 --test --host esxi2 --datastore ds2
                                            restore, boot, check, remove (a restore drill)
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "restore",
        help="restore a VM from a restore point",
        description="Restore a VM from a restore point. By default as a new VM beside the original, with"
        " new MAC addresses and UUIDs; the original is only replaced with --overwrite. Every written disk"
        " is checked by SHA-256 against the restore point before it is used.",
        epilog=_EXAMPLES,
        handler=cmd_restore,
    )
    parser.add_argument("vm", metavar="VM", help="the VM's name as backed up (see `points`)")
    parser.add_argument("--point", metavar="ID", default="latest", help="restore point id; default: latest")
    parser.add_argument("--repository", metavar="R", help="repository (default: the one holding the VM)")
    parser.add_argument("--host", metavar="H", help="target host; default: the host the point is from")
    parser.add_argument("--datastore", metavar="DS", help="target datastore; default: the original one")
    parser.add_argument("--name", metavar="NEW", help="name of the new VM; default: VM-restored-<time>")
    parser.add_argument(
        "--keep-identity",
        action="store_true",
        help="keep UUIDs and MAC addresses (the original must be gone)",
    )
    parser.add_argument("--power-on", action="store_true", help="power the VM on afterwards")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the disks of the existing VM (asks unless --yes)"
    )
    parser.add_argument("--yes", action="store_true", help="do not ask before overwriting")
    parser.add_argument(
        "--disk",
        metavar="LABEL|NODE",
        help="only this disk (e.g. 'Hard disk 2' or scsi0:1); with --overwrite",
    )
    parser.add_argument(
        "--to-vm", metavar="VM", help="with --overwrite: the VM whose disks are replaced; default: VM"
    )
    parser.add_argument("--test", action="store_true", help="restore as a temporary VM, boot it, remove it")


def find_repository(args: argparse.Namespace, desired: DesiredState, command: str) -> str | None:
    """The repository named by ``--repository``, else the only one holding points of ``args.vm``;
    None after printing why not (exit 2)."""
    from reconciler.operations.backup import open_repository

    if args.repository:
        if args.repository not in desired.repositories:
            print(f"esxi-reconciler {command}: no Repository named {args.repository!r}", file=sys.stderr)
            return None
        return str(args.repository)
    holding = []
    for name, cfg in desired.repositories.items():
        try:
            repo = open_repository(cfg)
            with repo.lock(purpose="find points"):
                if repo.list_points(vm=args.vm):
                    holding.append(name)
        except Exception as exc:
            log.warning("restore.repository_unreadable", repository=name, error=str(exc))
    if len(holding) == 1:
        return holding[0]
    if holding:
        why = f"several repositories hold {args.vm!r}: {', '.join(holding)}; choose one with --repository"
    else:
        why = f"no repository has restore points of VM {args.vm!r}"
    print(f"esxi-reconciler {command}: {why}", file=sys.stderr)
    return None


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    print(question + " [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_restore(args: argparse.Namespace) -> int:
    """0 restored; 1 the restore failed; 2 bad input or refused."""
    from reconciler.esxi.host import sigterm_raises
    from reconciler.operations.backup import open_repository
    from reconciler.operations.hosts import connect
    from reconciler.operations.progress import Progress
    from reconciler.operations.restore import (
        RestoreError,
        RestoreOptions,
        find_point,
        restore_new_vm,
        restore_overwrite,
        run_test_restore,
    )

    if args.disk and not args.overwrite:
        print(
            "esxi-reconciler restore: --disk replaces a disk of an existing VM: add --overwrite",
            file=sys.stderr,
        )
        return 2
    if args.overwrite and (args.test or args.name or args.keep_identity):
        print(
            "esxi-reconciler restore: --overwrite cannot be combined with --test, --name or --keep-identity",
            file=sys.stderr,
        )
        return 2
    desired = load_desired(args)
    if desired is None:
        return 2
    repo_name = find_repository(args, desired, "restore")
    if repo_name is None:
        return 2
    repo = open_repository(desired.repositories[repo_name])
    with repo.lock(purpose=f"restore of {args.vm}"):
        try:
            point = find_point(repo, args.vm, args.point)
        except RestoreError as exc:
            print(f"esxi-reconciler restore: {printable(str(exc))}", file=sys.stderr)
            return 2
        host_name = args.host or point.vm.host
        if host_name not in desired.hosts:
            print(f"esxi-reconciler restore: no Host named {host_name!r} in the config", file=sys.stderr)
            return 2
        target_name = args.to_vm or args.vm
        print(
            f"restore point {point.id} of {printable(point.vm.name)}"
            f" ({point.snapshot_time:%Y-%m-%d %H:%M} UTC,"
            f" {plural(len(point.disks), 'disk')}, {human_size(sum(d.capacity for d in point.disks))})"
        )
        progress = Progress(operation="restore")
        with connect(desired.host(host_name)) as host, sigterm_raises():
            try:
                if args.test:
                    with progress:
                        tr = run_test_restore(host, repo, point, datastore=args.datastore, progress=progress)
                    print(printable(tr.message))
                    return 0 if tr.ok else 1
                options = RestoreOptions(
                    name=args.name,
                    datastore=args.datastore,
                    keep_identity=args.keep_identity,
                    power_on=args.power_on,
                    progress=progress,
                )
                if args.overwrite:
                    matches = [v for v in host.list_vms() if v.name == target_name]
                    if len(matches) != 1:
                        print(
                            f"esxi-reconciler restore: host {host.name} has {len(matches)} VMs named"
                            f" {target_name!r}, so there is nothing to overwrite; restore it as a new VM"
                            " (without --overwrite, with --name if needed)",
                            file=sys.stderr,
                        )
                        return 2
                    target = matches[0]
                    what = f"disk {args.disk!r} of" if args.disk else "the disks of"
                    question = (
                        f"Overwrite {what} VM {target.name!r} on {host.name} with restore point {point.id}?"
                        f" The VM will be powered off ({target.power_state} now)."
                    )
                    if not args.yes and not _confirm(question):
                        print(
                            "esxi-reconciler restore: not confirmed; nothing changed (use --yes when not on a"
                            " terminal)",
                            file=sys.stderr,
                        )
                        return 2
                    with progress:
                        result = restore_overwrite(host, repo, point, target, options, disk=args.disk)
                    count = plural(len(result.disks), "disk")
                    print(f"overwrote {count} of {printable(result.vm_name)} (verified by SHA-256)")
                else:
                    with progress:
                        result = restore_new_vm(host, repo, point, options)
                    print(
                        f"restored as new VM '{printable(result.vm_name)}' (vmid {result.vmid})"
                        f" at {printable(result.vmx_path)}"
                    )
                for d in result.disks:
                    print(printable(f"  {d.label} ({d.node}): {d.descriptor} sha256 {d.sha256[:16]}… ok"))
                if result.powered_on:
                    print("  powered on")
                return 0
            except RestoreError as exc:
                print(f"esxi-reconciler restore: {printable(str(exc))}", file=sys.stderr)
                return 1
            except Exception as exc:
                log.error("restore.failed", error=str(exc), error_type=exc.__class__.__name__, exc_info=True)
                print(f"esxi-reconciler restore: FAILED: {printable(str(exc))}", file=sys.stderr)
                return 1
