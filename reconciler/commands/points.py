"""``esxi-reconciler points``: list restore points; ``points protect|unprotect|forget ID...``: keep one
whatever the retention, give it back to the retention, or delete it now."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    add_yes_option,
    ask,
    emit_json,
    error_document,
    fail,
    load_desired,
    plural,
    unknown_name,
)
from reconciler.facts.points import RestorePoint
from reconciler.planning.backup_mode import describe_mode, per_disks
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

A repository that cannot be read (not mounted, wrong passphrase, locked) is an error (exit 1),
never "no restore points"; the points of the others are still listed.
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

Exit 0 forgotten (and, with --gc, freed); 1 failed, declined, or GC deferred by a running backup;
64 an unknown point, a refused one (protected, newest without --force), or no terminal to ask
on without --yes.
"""

_PROTECT_EXAMPLES = """\
examples:
  esxi-reconciler points protect 20261120T020000000000Z-1a2b3c4d
  esxi-reconciler points unprotect 20261120T020000000000Z-1a2b3c4d --json

A protected point is never deleted: the retention neither prunes it nor counts it, and
`points forget` refuses it. `points` shows the flag (PROT column, "protected" in --json).

Exit 0 done (also when it already was so); 1 failed; 64 an unknown point or repository.
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
        (d.label, describe_mode(d.mode, d.reasons))
        for d in point.disks
        if d.mode is not None and (d.mode == "full" or len(d.reasons) > 1)
    )
    if not lines and point.fallback_reason and all(d.mode is None for d in point.disks):
        lines.append(f"full: {point.fallback_reason}")
    return lines


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
) -> dict[str, tuple[Repository, list[RestorePoint]]]:
    """The repositories holding ``args.point_ids``, opened, with all their points. Stops the verb for an
    unknown repository or point (64), or for a point that may be in a repository that could not be read
    (1, the cause named)."""
    from reconciler.operations.failures import explain
    from reconciler.operations.repositories import open_repository

    names = list(desired.repositories)
    if args.repository is not None:
        if args.repository not in desired.repositories:
            unknown_name(f"points {command}", "Repository", args.repository, sorted(names))
        names = [args.repository]
    wanted = list(dict.fromkeys(args.point_ids))
    found: dict[str, tuple[Repository, list[RestorePoint]]] = {}
    unreadable: list[str] = []
    for name in names:
        try:
            repo = open_repository(desired.repositories[name])
            with repo.lock(purpose=f"points {command}"):
                if set(repo.point_ids()).intersection(wanted):
                    found[name] = (repo, repo.list_points())
        except Exception as error:
            explained = explain(error)
            if explained is None:
                raise
            message = explained.message if name in explained.message else f"repository {name}: {explained}"
            _err(command, message)
            unreadable.append(message)
    held = {p.id for _, points in found.values() for p in points}
    missing = [i for i in wanted if i not in held]
    if missing:
        which = ", ".join(repr(i) for i in missing)
        if unreadable:
            fail(f"restore point {which} not found; {'; '.join(unreadable)}", "repository-unreadable")
        where = args.repository or ", ".join(names) or "no repository configured"
        fail(f"no restore point {which} in {where}; `esxi-reconciler points` lists them", "no-point", "usage")
    return found


def _set_protection(args: argparse.Namespace, protect: bool) -> int:
    command = "protect" if protect else "unprotect"
    found = _locate(args, load_desired(args), command)
    rows: list[dict[str, Any]] = []
    for name, (repo, points) in found.items():
        ids = {p.id for p in points}
        with repo.lock(purpose=f"points {command}"):
            for point_id in dict.fromkeys(args.point_ids):
                if point_id not in ids:
                    continue
                point = repo.read_point(point_id)
                changed = point.protected != protect
                if changed:
                    point = repo.set_protected(point_id, protect)
                    log.info(f"points.{command}ed", point=point_id, repository=name)
                rows.append({**_point_row(name, point), "changed": changed})
    for row in rows:
        if protect:
            what = "protected" if row["changed"] else "already protected"
            print(f"{what}: {_describe(row)}; kept whatever the retention says")
        else:
            what = "unprotected" if row["changed"] else "not protected"
            print(f"{what}: {_describe(row)}; the retention decides about it (the next prune may delete it)")
    if args.json:
        emit_json({"ok": True, "points": rows})
    return ExitCode.OK


def cmd_points_protect(args: argparse.Namespace) -> int:
    """``points protect ID...``: 0 done, 1 failed, 64 an unknown point."""
    return _set_protection(args, True)


def cmd_points_unprotect(args: argparse.Namespace) -> int:
    """``points unprotect ID...``: 0 done, 1 failed, 64 an unknown point."""
    return _set_protection(args, False)


def _rows_to_forget(
    found: dict[str, tuple[Repository, list[RestorePoint]]], wanted: list[str], *, force: bool
) -> dict[str, dict[str, Any]]:
    """A row per point asked for; stops the verb (64, nothing deleted yet) at a point forget refuses."""
    from reconciler.operations.prune import forget_refusal

    rows: dict[str, dict[str, Any]] = {}
    for name, (_, points) in found.items():
        for point in points:
            if point.id in wanted:
                rows[point.id] = {**_point_row(name, point), "decision": None, "reason": None}
                refusal = forget_refusal(point, points, force=force)
                if refusal is not None:
                    fail(
                        f"{refusal}; nothing was forgotten",
                        "protected" if point.protected else "newest-point",
                        "usage",
                    )
    return rows


def cmd_points_forget(args: argparse.Namespace) -> int:
    """``points forget ID... [--force] [--gc] [--yes]``: 0 forgotten, 1 failed, declined or GC deferred, 64
    an unknown or refused point, or not asked (before anything was deleted)."""
    from reconciler.operations.failures import explain
    from reconciler.operations.prune import forget

    if args.wait < 0:
        fail("--wait must not be negative", "usage", "usage")
    found = _locate(args, load_desired(args), "forget")
    wanted = list(dict.fromkeys(args.point_ids))
    rows = _rows_to_forget(found, wanted, force=args.force)
    ordered = [rows[i] for i in wanted]
    print(f"to forget ({plural(len(ordered), 'restore point')}, cannot be restored afterwards):")
    for row in ordered:
        print(f"  {_describe(row)}")
    ask(args, f"Forget {plural(len(ordered), 'restore point')} for good?", "nothing was forgotten")
    status = ExitCode.OK
    gc_entries: list[dict[str, Any]] = []
    for name, (repo, _) in found.items():
        ids = [i for i in wanted if rows[i]["repository"] == name]
        try:
            results = forget(repo, ids, force=args.force)
        except Exception as error:
            explained = explain(error)
            if explained is None:
                raise
            _err("forget", f"repository {name}: {explained}")
            status = ExitCode.FAILED
            for i in ids:
                rows[i].update(decision="failed", reason=explained.message)
            continue
        for result in results:
            row = rows[result.point_id]
            row.update(decision=result.decision, reason=result.reason)
            if result.decision == "deleted":
                print(f"forgotten: {_describe(row)}")
            else:
                status = ExitCode.FAILED
                _err("forget", f"{result.point_id}: not forgotten: {result.reason}")
        if args.gc:
            gc_entries.append(_collect(name, repo, args.wait))
            status = status if gc_entries[-1]["ok"] else ExitCode.FAILED
    if not args.gc:
        repos = sorted({row["repository"] for row in ordered if row["decision"] == "deleted"})
        if repos:
            print(
                "their data stays in the repository until garbage collection: "
                + "; ".join(f"esxi-reconciler repo gc {r}" for r in repos)
                + " (or points forget --gc; the daemon runs GC after its next prune)"
            )
    if args.json:
        emit_json({"ok": status == ExitCode.OK, "points": ordered, "gc": gc_entries if args.gc else None})
    return status


def _collect(name: str, repo: Repository, wait: float) -> dict[str, Any]:
    """``--gc``: one repository's garbage collection, as an entry of the ``gc`` list of ``--json``."""
    from reconciler.commands.repo import gc_line
    from reconciler.operations.failures import explain
    from reconciler.operations.prune import collect

    entry: dict[str, Any] = {"repository": name, "path": str(repo.path)}
    try:
        gc = collect(repo, wait_seconds=wait)
    except Exception as error:
        explained = explain(error)
        if explained is None:
            raise
        _err("forget", f"repository {name}: GC failed: {explained}")
        return {**entry, "ok": False, "error": explained.message, "deferred": None}
    if gc.report is None:
        _err("forget", f"repository {name}: {gc.deferred}; run `esxi-reconciler repo gc {name}` later")
        return {**entry, "ok": False, "error": None, "deferred": gc.deferred}
    print(gc_line(name, repo.path, gc.report))
    return {**entry, "ok": True, "error": None, "deferred": None, **gc.report.to_dict()}
