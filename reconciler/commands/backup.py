"""``esxi-reconciler backup POLICY``: a one-shot backup of a policy's VMs."""

from __future__ import annotations

import argparse
import sys

import structlog

from reconciler.commands.common import add_command, load_desired
from reconciler.printable import printable
from reconciler.units import human_size

log = structlog.get_logger("reconciler.cli")


_BACKUP_EXAMPLES = """\
examples:
  esxi-reconciler backup web-daily                  every VM the policy selects
  esxi-reconciler backup web-daily --vm "db 01"     one VM
  esxi-reconciler backup web-daily --full           read whole disks (no incremental)

Prints one line per VM: mode (full, cbt, digest), bytes read on the host, sent over
the network and newly stored, time and restore point id. SIGTERM/Ctrl-C stop the run
and remove the snapshots taken; no partial restore point is ever listed.

exit status: 0 every VM backed up, 1 some VM failed, 2 usage or configuration error
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "backup",
        help="back up the VMs of a policy now (one-shot)",
        description="Snapshot each VM of POLICY, read only what changed since its last restore point\n"
        "(CBT on licensed hosts, on-host block digests on free hosts), store a restore point.",
        epilog=_BACKUP_EXAMPLES,
        handler=cmd_backup,
    )
    parser.add_argument("policy", metavar="POLICY", help="name of a BackupPolicy")
    parser.add_argument("--vm", metavar="NAME", help="only this VM (display name, exact)")
    parser.add_argument("--full", action="store_true", help="read whole disks instead of changes")


def cmd_backup(args: argparse.Namespace) -> int:
    """``esxi-reconciler backup POLICY``: 0 when every VM succeeded, 1 when any failed, 2 on bad input."""
    import threading

    from reconciler.esxi.signals import sigterm_raises
    from reconciler.operations.backup import BackupError, BackupOptions, VmResult, backup_policy
    from reconciler.operations.progress import Progress

    desired = load_desired(args)
    if desired is None:
        return 2

    cancel = threading.Event()
    progress = Progress()

    def show(res: VmResult) -> None:
        progress.clear_line()
        if res.ok:
            reason = f" (fallback: {res.fallback_reason})" if res.fallback_reason else ""
            print(
                printable(
                    f"{res.vm}: ok {res.mode} read {human_size(res.bytes_read)}"
                    f" sent {human_size(res.bytes_sent)} stored {human_size(res.bytes_stored)}"
                    f" in {res.seconds:.1f}s point {res.point_id}{reason}"
                ),
                flush=True,
            )
        else:
            kept = f" (point {res.point_id} kept)" if res.point_id else ""
            print(printable(f"{res.vm}: FAILED after {res.seconds:.1f}s: {res.error}{kept}"), flush=True)

    try:
        with sigterm_raises(), progress:
            results = backup_policy(
                desired,
                args.policy,
                vm=args.vm,
                options=BackupOptions(full=args.full, progress=progress),
                cancel=cancel,
                on_result=show,
            )
    except BackupError as error:
        print(f"esxi-reconciler backup: {printable(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esxi-reconciler backup: interrupted; snapshots removed, no partial point", file=sys.stderr)
        return 130
    except Exception as error:  # repository or host unreachable, secrets ...
        log.error("backup.failed", error=str(error))
        print(f"esxi-reconciler backup: {printable(str(error))}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} VMs backed up", flush=True)
    return 1 if failed else 0
