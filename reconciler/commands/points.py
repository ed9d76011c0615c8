"""``esxi-reconciler points``: list restore points; ``points protect|unprotect|forget ID...``: keep one
whatever the retention, give it back to the retention, or delete it now."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import add_command, add_yes_option, confirm, load_desired, plural
from reconciler.facts.points import RestorePoint
from reconciler.planning.backup_mode import describe, per_disks
from reconciler.printable import printable
from reconciler.units import human_size

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState
    from reconciler.repository import Repository

log = structlog.get_logger("reconciler.cli")


_POINTS_EXAMPLES = """\
examples:
  esxi-reconciler points                    every restore point of every repository
  esxi-reconciler points --vm web01 --json  one VM's points as JSON
  esxi-reconciler points protect ID         keep this point whatever the retention says
  esxi-reconciler points unprotect ID       let the retention decide about it again
  esxi-reconciler points forget ID --gc     delete it now and free its data (asks first)

exit status: 0 done, 1 failed (a repository could not be read or written), 2 usage or
configuration error, an unknown point, or refused (not confirmed, protected, newest point)
"""

_FORGET_EXAMPLES = """\
examples:
  esxi-reconciler points forget 20261120T020000000000Z-1a2b3c4d
                                            asks, then deletes it; its data stays until GC
  esxi-reconciler points forget ID1 ID2 --gc --yes
                                            two points, no question, then free their data now
  esxi-reconciler points forget ID --force  even the newest successful point of its VM

A forgotten point is gone for good: it cannot be restored. Its data is freed only by garbage
collection (--gc here, `esxi-reconciler repo gc`, or the daemon's next GC after pruning).
Protected points are refused: `points unprotect ID` first. The newest successful point of a VM
in its policy is refused unless --force (the daemon's prune never deletes it).

exit status: 0 forgotten (and GC done with --gc), 1 failed or GC deferred, 2 usage error, an
unknown point, or refused (not confirmed, protected, newest point without --force)
"""

_PROTECT_EXAMPLES = """\
examples:
  esxi-reconciler points protect 20261120T020000000000Z-1a2b3c4d
  esxi-reconciler points unprotect 20261120T020000000000Z-1a2b3c4d --json

A protected point is never deleted: the retention neither prunes it nor counts it, and
`points forget` refuses it. `points` shows the flag (PROT column, "protected" in --json).

exit status: 0 done (also when it already was so), 1 failed, 2 usage error or an unknown point
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
    parser.add_argument("--json", action="store_true", help="JSON output")
    verbs = parser.add_subparsers(dest="points_command", metavar="SUBCOMMAND")
    for name, protect in (("protect", True), ("unprotect", False)):
        sub = add_command(
            verbs,
            name,
            help="keep restore points whatever the retention says"
            if protect
            else "let the retention decide about restore points again",
            description="Mark restore points protected: never pruned, never counted by the retention, refused"
            " by `points forget`."
            if protect
            else "Remove the protection of restore points: the retention decides about them again (the"
            " next prune may delete them).",
            epilog=_PROTECT_EXAMPLES,
            handler=cmd_points_protect if protect else cmd_points_unprotect,
        )
        _point_arguments(sub)
    forget = add_command(
        verbs,
        "forget",
        help="delete restore points now (asks first)",
        description="Delete restore points now, for good. Their data becomes unreferenced and is freed by"
        " the next garbage collection (--gc: right away).",
        epilog=_FORGET_EXAMPLES,
        handler=cmd_points_forget,
    )
    _point_arguments(forget)
    forget.add_argument(
        "--force",
        action="store_true",
        help="also forget the newest successful point of a VM in its policy (never protected ones)",
    )
    forget.add_argument("--gc", action="store_true", help="then run garbage collection to free their data")
    forget.add_argument(
        "--wait",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="with --gc: wait up to this long for a running backup to release the repository (default: 0)",
    )
    add_yes_option(forget, "forgetting")


def _point_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("point_ids", metavar="ID", nargs="+", help="restore point id (see `points`)")
    parser.add_argument(
        "--repository", metavar="R", help="the repository holding them (default: found in every one)"
    )
    parser.add_argument("--json", action="store_true", help="JSON output")


def cmd_points(args: argparse.Namespace) -> int:
    """``esxi-reconciler points``: 0, or 1 if a repository could not be read."""
    from reconciler.operations.repositories import open_repository

    desired = load_desired(args)
    if desired is None:
        return 2
    rows: list[dict[str, Any]] = []
    why: list[list[str]] = []
    status = 0
    for name, repo_cfg in desired.repositories.items():
        try:
            repo = open_repository(repo_cfg)
            with repo.lock(purpose="list points"):
                points = repo.list_points(vm=args.vm)
        except Exception as error:
            print(f"esxi-reconciler points: repository {name}: {printable(str(error))}", file=sys.stderr)
            status = 1
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
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return status
    if rows:
        # a name backed up as several VMs (two hosts, a re-created VM): show the UUIDs that tell them apart
        identities: dict[str, set[tuple[str, str]]] = {}
        for r in rows:
            identities.setdefault(r["vm"], set()).add((r["host"], r["uuid"]))
        keys = ["id", "repository", "policy", "vm", "host"]
        if any(len(ids) > 1 for ids in identities.values()):
            keys.append("uuid")
        header = (*(k.upper() for k in keys), "TIME", "STATUS", "MODE", "SIZE", "SENT", "STORED", "PROT")
        table = [header]
        for r in rows:
            plain = [printable(r[k]) for k in keys]
            sizes = [human_size(r[k]) for k in ("size", "sent", "stored")]
            prot = "yes" if r["protected"] else ""
            table.append((*plain, r["time"][:19], r["status"], r["mode"], *sizes, prot))
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        print("  ".join(str(cell).ljust(w) for cell, w in zip(header, widths, strict=True)).rstrip())
        for row, lines in zip(table[1:], why, strict=True):
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
            for line in lines:
                print(f"    {printable(line)}")
    else:
        print("no restore points")
    return status


def _point_row(repository: str, point: RestorePoint) -> dict[str, Any]:
    """How one point is named in the output of protect, unprotect and forget."""
    return {
        "id": point.id,
        "repository": repository,
        "policy": point.policy,
        "vm": point.vm.name,
        "host": point.vm.host,
        "uuid": point.vm.uuid,
        "time": point.snapshot_time.isoformat(),
        "status": point.status,
        "protected": point.protected,
    }


def _describe(row: dict[str, Any]) -> str:
    return printable(
        f"restore point {row['id']} of VM {row['vm']!r} (on {row['host']}, policy {row['policy']},"
        f" {row['time'][:16].replace('T', ' ')} UTC) in {row['repository']}"
    )


def _err(command: str, message: str) -> None:
    print(f"esxi-reconciler points {command}: {printable(message)}", file=sys.stderr)


def _locate(
    args: argparse.Namespace, desired: DesiredState, command: str
) -> tuple[dict[str, tuple[Repository, list[RestorePoint]]], int]:
    """The repositories holding ``args.point_ids`` (opened, with all their points), and 0; or what to
    exit with (1 a repository could not be read, 2 an unknown repository or point) after saying why."""
    from reconciler.operations.repositories import open_repository

    names = list(desired.repositories)
    if args.repository is not None:
        if args.repository not in desired.repositories:
            _err(
                command, f"no Repository named {args.repository!r} (configured: {', '.join(names) or 'none'})"
            )
            return {}, 2
        names = [args.repository]
    wanted = list(dict.fromkeys(args.point_ids))
    found: dict[str, tuple[Repository, list[RestorePoint]]] = {}
    unreadable = False
    for name in names:
        try:
            repo = open_repository(desired.repositories[name])
            with repo.lock(purpose=f"points {command}"):
                ids = set(repo.point_ids())
                if ids.intersection(wanted):
                    found[name] = (repo, repo.list_points())
        except Exception as error:
            _err(command, f"repository {name}: {error}")
            unreadable = True
    held = {p.id for _, points in found.values() for p in points}
    missing = [i for i in wanted if i not in held]
    for point_id in missing:
        where = args.repository or ", ".join(names) or "no repository configured"
        _err(command, f"no restore point {point_id!r} in {where}; `esxi-reconciler points` lists them")
    if missing:
        return found, 1 if unreadable else 2
    return found, 0


def _set_protection(args: argparse.Namespace, protect: bool) -> int:
    command = "protect" if protect else "unprotect"
    desired = load_desired(args)
    if desired is None:
        return 2
    found, status = _locate(args, desired, command)
    if status:
        return status
    rows: list[dict[str, Any]] = []
    for name, (repo, points) in found.items():
        by_id = {p.id: p for p in points}
        try:
            with repo.lock(purpose=f"points {command}"):
                for point_id in dict.fromkeys(args.point_ids):
                    if point_id not in by_id:
                        continue
                    point = repo.read_point(point_id)
                    changed = point.protected != protect
                    if changed:
                        point = repo.set_protected(point_id, protect)
                        log.info(f"points.{command}ed", point=point_id, repository=name)
                    rows.append({**_point_row(name, point), "changed": changed})
        except Exception as error:
            _err(command, f"repository {name}: {error}")
            status = 1
    if args.json:
        print(json.dumps({"ok": status == 0, "points": rows}, indent=2, ensure_ascii=False))
        return status
    for row in rows:
        if protect:
            what = "protected" if row["changed"] else "already protected"
            print(f"{what}: {_describe(row)}; kept whatever the retention says")
        else:
            what = "unprotected" if row["changed"] else "not protected"
            print(f"{what}: {_describe(row)}; the retention decides about it (the next prune may delete it)")
    return status


def cmd_points_protect(args: argparse.Namespace) -> int:
    """``points protect ID...``: 0 done, 1 failed, 2 bad input."""
    return _set_protection(args, True)


def cmd_points_unprotect(args: argparse.Namespace) -> int:
    """``points unprotect ID...``: 0 done, 1 failed, 2 bad input."""
    return _set_protection(args, False)


def cmd_points_forget(args: argparse.Namespace) -> int:
    """``points forget ID... [--force] [--gc] [--yes]``: 0 forgotten, 1 failed or GC deferred, 2 bad input or
    refused (before anything was deleted)."""
    from reconciler.commands.repo import gc_line
    from reconciler.operations.prune import collect, forget, forget_refusal

    if args.wait < 0:
        _err("forget", "--wait must not be negative")
        return 2
    desired = load_desired(args)
    if desired is None:
        return 2
    found, status = _locate(args, desired, "forget")
    if status:
        return status
    wanted = list(dict.fromkeys(args.point_ids))
    rows: dict[str, dict[str, Any]] = {}
    refusals: list[str] = []
    for name, (_, points) in found.items():
        for point in points:
            if point.id in wanted:
                rows[point.id] = {**_point_row(name, point), "decision": None, "reason": None}
                refusal = forget_refusal(point, points, force=args.force)
                if refusal is not None:
                    rows[point.id].update(decision="refused", reason=refusal)
                    refusals.append(refusal)
    ordered = [rows[i] for i in wanted]

    def refuse(why: str) -> int:
        """Nothing was forgotten: say why (and in --json, the points with their refusals)."""
        if args.json:
            out = {"ok": False, "error": why, "points": ordered, "gc": None}
            print(json.dumps(out, indent=2, ensure_ascii=False))
        _err("forget", f"{why}; nothing was forgotten")
        return 2

    if refusals:
        for refusal in refusals[:-1]:
            _err("forget", refusal)
        return refuse(refusals[-1])
    if not args.json:
        print(f"to forget ({plural(len(ordered), 'restore point')}, cannot be restored afterwards):")
        for row in ordered:
            print(f"  {_describe(row)}")
    if not args.yes:
        answer = confirm(f"Forget {plural(len(ordered), 'restore point')} for good?")
        if answer is None:
            return refuse("not asking without a terminal: pass --yes to forget them")
        if not answer:
            return refuse("not confirmed")
    gc_entries: list[dict[str, Any]] = []
    for name, (repo, _) in found.items():
        ids = [i for i in wanted if rows[i]["repository"] == name]
        try:
            results = forget(repo, ids, force=args.force)
        except Exception as error:
            _err("forget", f"repository {name}: {error}")
            status = 1
            for i in ids:
                rows[i].update(decision="failed", reason=str(error))
            continue
        for result in results:
            row = rows[result.point_id]
            row.update(decision=result.decision, reason=result.reason)
            if result.decision != "deleted":
                status = 1
            if not args.json:
                if result.decision == "deleted":
                    print(f"forgotten: {_describe(row)}")
                else:
                    _err("forget", f"{result.point_id}: not forgotten: {result.reason}")
        if args.gc:
            entry: dict[str, Any] = {"repository": name, "path": str(repo.path)}
            try:
                gc = collect(repo, wait_seconds=args.wait)
            except Exception as error:
                gc = None
                entry.update(ok=False, error=str(error), deferred=None)
                _err("forget", f"repository {name}: GC failed: {error}")
            if gc is not None and gc.report is None:
                entry.update(ok=False, error=None, deferred=gc.deferred)
                _err(
                    "forget", f"repository {name}: {gc.deferred}; run `esxi-reconciler repo gc {name}` later"
                )
            elif gc is not None and gc.report is not None:
                entry.update(ok=True, error=None, deferred=None, **gc.report.to_dict())
                if not args.json:
                    print(gc_line(name, repo.path, gc.report))
            status = status or (0 if entry["ok"] else 1)
            gc_entries.append(entry)
    if args.json:
        out = {"ok": status == 0, "error": None, "points": ordered, "gc": gc_entries if args.gc else None}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return status
    if not args.gc:
        repos = sorted({row["repository"] for row in ordered if row["decision"] == "deleted"})
        if repos:
            print(
                "their data stays in the repository until garbage collection: "
                + "; ".join(f"esxi-reconciler repo gc {r}" for r in repos)
                + " (or points forget --gc; the daemon runs GC after its next prune)"
            )
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
