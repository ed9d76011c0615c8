"""``esxi-reconciler points``: list restore points."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import structlog

from reconciler.commands.common import ExitCode, add_command, emit_json, error_document, load_desired
from reconciler.facts.points import RestorePoint
from reconciler.planning.backup_mode import describe, per_disks
from reconciler.printable import printable
from reconciler.units import human_size

log = structlog.get_logger("reconciler.cli")


_POINTS_EXAMPLES = """\
examples:
  esxi-reconciler points                    every restore point of every repository
  esxi-reconciler points --vm web01 --json  one VM's points as JSON

A repository that cannot be read (not mounted, wrong passphrase, locked) is an error (exit 1),
never "no restore points"; the points of the others are still listed.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "points",
        help="list restore points",
        description="List the complete restore points of every configured repository, oldest first, with"
        " the host each VM was backed up on (and its UUID where one name stands for several VMs). Under a"
        " point, a line per disk says why it was read in full or why a faster mode was not used; --json"
        " gives every disk's mode and reasons.",
        epilog=_POINTS_EXAMPLES,
        handler=cmd_points,
    )
    parser.add_argument("--vm", metavar="NAME", help="only points of this VM (display name)")


def cmd_points(args: argparse.Namespace) -> int:
    """``esxi-reconciler points``: 0, or 1 if a repository could not be read."""
    from reconciler.operations.failures import explain
    from reconciler.operations.repositories import open_repository

    desired = load_desired(args)
    rows: list[dict[str, Any]] = []
    why: list[list[str]] = []
    unreadable: list[tuple[str, str, str]] = []
    for name, repo_cfg in desired.repositories.items():
        try:
            repo = open_repository(repo_cfg)
            with repo.lock(purpose="list points"):
                points = repo.list_points(vm=args.vm)
        except Exception as error:
            explained = explain(error)
            if explained is None:
                raise
            message = explained.message if name in explained.message else f"repository {name}: {explained}"
            print(f"esxi-reconciler points: {printable(message)}", file=sys.stderr)
            unreadable.append((name, explained.code, message))
            continue
        for p in points:
            rows.append(
                {
                    "repository": name,
                    "id": p.id,
                    "policy": p.policy,
                    "vm": p.vm.name,
                    "host": p.vm.host,
                    "uuid": p.vm.uuid,
                    "vmid": p.vm.vmid,
                    "time": p.snapshot_time.isoformat(),
                    "status": p.status,
                    "mode": p.mode,
                    "fallback_reason": p.fallback_reason,
                    "protected": p.protected,
                    "size": sum(d.capacity for d in p.disks),
                    "read": sum(d.bytes_read for d in p.disks),
                    "sent": sum(d.bytes_sent for d in p.disks),
                    "stored": sum(d.bytes_stored for d in p.disks),
                    "disks": [
                        {"key": d.key, "label": d.label, "mode": d.mode, "reasons": list(d.reasons)}
                        for d in p.disks
                    ],
                }
            )
            why.append(_why(p))
    status = ExitCode.FAILED if unreadable else ExitCode.OK
    if args.json:
        if unreadable:
            code = unreadable[0][1] if len(unreadable) == 1 else "repositories-unreadable"
            message = "; ".join(m for _, _, m in unreadable)
            emit_json(
                error_document(
                    "points",
                    code,
                    message,
                    status,
                    points=rows,
                    unreadable=[{"repository": n, "code": c, "message": m} for n, c, m in unreadable],
                )
            )
        else:
            emit_json(rows)
        return status
    if rows:
        # a name backed up as several VMs (two hosts, a re-created VM): show the UUIDs that tell them apart
        identities: dict[str, set[tuple[str, str]]] = {}
        for r in rows:
            identities.setdefault(r["vm"], set()).add((r["host"], r["uuid"]))
        keys = ["id", "repository", "policy", "vm", "host"]
        if any(len(ids) > 1 for ids in identities.values()):
            keys.append("uuid")
        header = (*(k.upper() for k in keys), "TIME", "STATUS", "MODE", "SIZE", "SENT", "STORED")
        table = [header]
        for r in rows:
            plain = [printable(r[k]) for k in keys]
            sizes = [human_size(r[k]) for k in ("size", "sent", "stored")]
            table.append((*plain, r["time"][:19], r["status"], r["mode"], *sizes))
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        print("  ".join(str(cell).ljust(w) for cell, w in zip(header, widths, strict=True)).rstrip())
        for row, lines in zip(table[1:], why, strict=True):
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
            for line in lines:
                print(f"    {printable(line)}")
    elif unreadable:
        pass  # not "no restore points": the repositories that hold them could not be read (stderr says why)
    else:
        print("no restore points")
    return status


def _why(point: RestorePoint) -> list[str]:
    """The lines shown under a point: the disks read in full, or incremental with a faster mode passed
    over (more than the one plain reason), with their reasons (disks with the same ones on one line);
    for a point written before disks recorded them, its fallback reason."""
    lines = per_disks(
        (d.label, describe(d.mode, d.reasons))
        for d in point.disks
        if d.mode is not None and (d.mode == "full" or len(d.reasons) > 1)
    )
    if not lines and point.fallback_reason and all(d.mode is None for d in point.disks):
        lines.append(f"full: {point.fallback_reason}")
    return lines
