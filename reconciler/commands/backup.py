"""``esxi-reconciler backup POLICY``: a one-shot backup of a policy's VMs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import ExitCode, add_command, emit_json, fail, load_desired, unknown_name
from reconciler.printable import printable
from reconciler.units import human_size

if TYPE_CHECKING:
    from reconciler.operations.backup import VmResult

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


def result_dict(res: VmResult) -> dict[str, Any]:
    """One VM's backup as JSON (``backup`` and ``apply`` print it)."""
    return {
        "vm": res.vm,
        "host": res.host,
        "policy": res.policy,
        "ok": res.ok,
        "status": "ok" if res.ok else "failed",
        "point_id": res.point_id,
        "mode": res.mode,
        "fallback_reason": res.fallback_reason,
        "error": res.error,
        "seconds": round(res.seconds, 3),
        "bytes_read": res.bytes_read,
        "bytes_sent": res.bytes_sent,
        "bytes_stored": res.bytes_stored,
        "disks": [
            {
                "label": d.label,
                "mode": d.mode,
                "fallback_reason": d.fallback_reason,
                "reasons": list(d.reasons),
                "capacity": d.capacity,
                "bytes_read": d.bytes_read,
                "bytes_sent": d.bytes_sent,
                "bytes_stored": d.bytes_stored,
                "seconds": round(d.seconds, 3),
            }
            for d in res.disks
        ],
    }


def cmd_backup(args: argparse.Namespace) -> int:
    """``esxi-reconciler backup POLICY``: 0 when every VM succeeded, 1 when any failed."""
    import threading

    from reconciler.esxi.signals import sigterm_raises
    from reconciler.operations.backup import BackupError, BackupOptions, backup_policy
    from reconciler.operations.failures import explain
    from reconciler.operations.progress import Progress

    desired = load_desired(args)
    if args.policy not in desired.policies:
        unknown_name("backup", "BackupPolicy", args.policy, sorted(desired.policies))
    policy = desired.policies[args.policy]
    host_cfg = desired.host(policy.host)

    cancel = threading.Event()
    progress = Progress(tty=False if args.json else None)

    def show(res: VmResult) -> None:
        if args.json:
            return
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
        fail(str(error), "unknown-name", "usage")
    except KeyboardInterrupt:
        print("esxi-reconciler backup: interrupted; snapshots removed, no partial point", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as error:  # repository or host unusable, secrets ...
        explained = explain(error, host=host_cfg.name, address=f"{host_cfg.address}:{host_cfg.api.port}")
        if explained is None:
            raise
        log.error("backup.failed", policy=args.policy, error=explained.message)
        raise explained from error
    failed = [r for r in results if not r.ok]
    if args.json:
        emit_json(
            {
                "ok": not failed,
                "policy": args.policy,
                "vms": [result_dict(r) for r in results],
                "backed_up": len(results) - len(failed),
                "failed": len(failed),
            }
        )
    else:
        print(f"{len(results) - len(failed)} of {len(results)} VMs backed up", flush=True)
    return ExitCode.FAILED if failed else ExitCode.OK
