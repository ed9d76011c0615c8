"""``esxi-reconciler restore``: bring a VM back from a restore point (new VM, overwrite, one disk, test),
or give up an interrupted overwrite (``--abort``).

A VM name may stand for several backed-up VMs (the same name on two hosts, a VM re-created with a new
UUID): the point is chosen by VM identity, never by name alone. ``--from-host`` says which host's VM;
``--host`` stays the *target* host, and with ``--overwrite`` names the VM to overwrite, whose own points
are then used. Putting one VM's point over another VM needs ``--to-vm``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    add_point_selection,
    emit_json,
    fail,
    load_desired,
    plural,
)
from reconciler.printable import printable
from reconciler.units import human_size

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState
    from reconciler.facts.inventory import VmInfo
    from reconciler.facts.points import RestorePoint
    from reconciler.operations.ports import RestoreHost
    from reconciler.operations.progress import Progress
    from reconciler.operations.restore import RestoreOptions, RestoreResult
    from reconciler.repository import Repository

log = structlog.get_logger("reconciler.cli")

_EXAMPLES = """\
examples:
  esxi-reconciler restore web01             newest point of web01 as a NEW VM beside it
                                            (web01-restored-<time>; nothing existing is touched)
  esxi-reconciler restore web01 --point 20260101T020000000000Z-1a2b3c4d --power-on
  esxi-reconciler restore web01 --overwrite
                                            put web01's disks back (asks; powers it off first)
  esxi-reconciler restore web01 --overwrite --host esxi1
                                            web01 exists on esxi1 and esxi2: esxi1's web01, from its
                                            own newest point
  esxi-reconciler restore web01 --from-host esxi2 --host esxi1 --name web01-dr
                                            esxi2's web01 as a new VM on esxi1
  esxi-reconciler restore web01 --overwrite --disk "Hard disk 2" --yes
                                            only the data disk, no question
  esxi-reconciler restore web01 --abort --host esxi1
                                            an --overwrite was killed: remove what it wrote and power
                                            web01 back on as it was
  esxi-reconciler restore web01 --test --host esxi2 --datastore ds2
                                            restore, boot, check, remove (a restore drill)

Exit 0 restored; 1 the restore failed, was declined, or its repository or host could not be used
(the cause is named: wrong passphrase, volume not mounted, host unreachable ...); 64 the options
do not fit together, a name is not in the config, or --overwrite has no terminal to ask and no --yes.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "restore",
        help="restore a VM from a restore point",
        description="Restore a VM from a restore point. By default as a new VM beside the original, with"
        " new MAC addresses and UUIDs; the original is only replaced with --overwrite, and only with its own"
        " points (same host and UUID) unless --to-vm says otherwise. Every written disk is checked by"
        " SHA-256 against the restore point before it is used.",
        epilog=_EXAMPLES,
        handler=cmd_restore,
    )
    add_point_selection(parser)
    parser.add_argument(
        "--host",
        metavar="H",
        help="target host; default: the host the point is from. With --overwrite: the host of the VM to"
        " overwrite (its own newest point is used unless --point or --from-host say otherwise)",
    )
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
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask before overwriting")
    parser.add_argument(
        "--disk",
        metavar="LABEL|NODE",
        help="only this disk (e.g. 'Hard disk 2' or scsi0:1); with --overwrite",
    )
    parser.add_argument(
        "--to-vm",
        metavar="VM",
        help="with --overwrite: overwrite this VM (on --host) with a point of VM even when it is another VM"
        " (another name, host or UUID); it keeps its own UUIDs and MAC addresses",
    )
    parser.add_argument("--test", action="store_true", help="restore as a temporary VM, boot it, remove it")
    parser.add_argument(
        "--abort",
        action="store_true",
        help="give up an --overwrite of VM that was killed or failed: remove what it wrote and power the VM"
        " back on if it was on (--host: on that host)",
    )


def find_repository(args: argparse.Namespace, desired: DesiredState, command: str) -> str:
    """The repository named by ``--repository``, else the only one holding points of ``args.vm`` (from
    ``args.from_host`` when given). Stops the verb when there is none, naming the repositories that could
    not be read and why (a wrong passphrase or an unmounted volume is the cause, not "no points")."""
    from reconciler.operations.failures import Failure, explain
    from reconciler.operations.repositories import open_repository

    if args.repository:
        if args.repository not in desired.repositories:
            from reconciler.commands.common import unknown_name

            unknown_name(command, "Repository", args.repository, sorted(desired.repositories))
        return str(args.repository)
    from_host = getattr(args, "from_host", None)
    holding = []
    unreadable: list[str] = []
    for name, cfg in desired.repositories.items():
        try:
            repo = open_repository(cfg)
            with repo.lock(purpose="find points"):
                if any(from_host in (None, p.vm.host) for p in repo.list_points(vm=args.vm)):
                    holding.append(name)
        except Exception as exc:
            explained = explain(exc)
            if explained is None:
                raise
            log.debug("restore.repository_unreadable", repository=name, error=explained.message)
            unreadable.append(
                explained.message if name in explained.message else f"repository {name}: {explained}"
            )
    if len(holding) == 1:
        return holding[0]
    what = f"{args.vm!r}" + (f" from {from_host}" if from_host else "")
    if holding:
        fail(
            f"several repositories hold {what}: {', '.join(holding)}; choose one with --repository",
            "ambiguous",
            "usage",
        )
    if unreadable:
        if len(unreadable) == len(desired.repositories):
            head = f"cannot look for restore points of VM {what}: "
        else:
            head = f"no readable repository has restore points of VM {what}; "
        fail(head + "; ".join(unreadable), "repository-unreadable")
    raise Failure(
        f"no repository has restore points of VM {what} (`esxi-reconciler points` lists them)", "no-points"
    )


def describe_point(point: RestorePoint) -> str:
    """The line every restore and export prints first: which VM and which point."""
    from reconciler.operations.restore import describe_source

    return printable(
        f"restore point {point.id} of {describe_source(point)}: {point.snapshot_time:%Y-%m-%d %H:%M} UTC,"
        f" {plural(len(point.disks), 'disk')}, {human_size(sum(d.capacity for d in point.disks))}"
    )


def _say(text: str) -> None:
    """Command output that holds names: control characters escaped (see :mod:`reconciler.printable`)."""
    print(printable(text))


def _err(message: str) -> None:
    print(f"esxi-reconciler restore: {printable(message)}", file=sys.stderr)


def _usage(message: str) -> NoReturn:
    fail(message, "usage", "usage")


def _result(action: str, point: RestorePoint, result: RestoreResult) -> dict[str, Any]:
    """A restore as JSON (docs/cli-json.md)."""
    return {
        "ok": True,
        "action": action,
        "point_id": point.id,
        "source": {"vm": point.vm.name, "host": point.vm.host, "uuid": point.vm.uuid},
        "host": result.host,
        "vm": result.vm_name,
        "vmid": result.vmid,
        "vmx_path": result.vmx_path,
        "disks": [
            {
                "label": d.label,
                "node": d.node,
                "path": d.descriptor,
                "sha256": d.sha256,
                "verified": d.verified,
                "bytes_written": d.written,
            }
            for d in result.disks
        ],
        "powered_on": result.powered_on,
        "power_state_before": result.power_state_before,
    }


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    print(printable(question) + " [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _option_error(args: argparse.Namespace) -> str | None:
    if args.abort:
        others = [
            flag
            for flag, given in (
                ("--overwrite", args.overwrite),
                ("--test", args.test),
                ("--point", args.point != "latest"),
                ("--from-host", args.from_host),
                ("--disk", args.disk),
                ("--name", args.name),
                ("--keep-identity", args.keep_identity),
                ("--datastore", args.datastore),
                ("--power-on", args.power_on),
            )
            if given
        ]
        if others:
            return f"--abort gives up an interrupted overwrite; it takes --host and --to-vm, not {others[0]}"
        return None
    if args.disk and not args.overwrite:
        return "--disk replaces a disk of an existing VM: add --overwrite"
    if args.to_vm and not args.overwrite:
        return "--to-vm names the VM to overwrite: add --overwrite (or use --name for a new VM)"
    if args.overwrite and (args.test or args.name or args.keep_identity):
        return "--overwrite cannot be combined with --test, --name or --keep-identity"
    return None


def cmd_restore(args: argparse.Namespace) -> int:  # noqa: C901  the verb's argument checks in order, each one message and exit 64, before the one restore call
    """0 restored; 1 the restore failed or was declined; 64 bad input."""
    from reconciler.esxi.signals import sigterm_raises
    from reconciler.operations.hosts import connect
    from reconciler.operations.progress import Progress
    from reconciler.operations.repositories import open_repository
    from reconciler.operations.restore import (
        AmbiguousVmError,
        OverwriteFailed,
        RestoreError,
        RestoreOptions,
        find_point,
        restore_new_vm,
        run_test_restore,
        unfinished_overwrite,
    )
    from reconciler.repository.errors import FormatError, MissingObjectError

    error = _option_error(args)
    if error is not None:
        _usage(error)
    desired = load_desired(args)
    if args.abort:
        return _abort(args, desired)
    if args.from_host and args.from_host not in desired.hosts:
        _err(f"note: {args.from_host!r} is not a Host of the config")
    repo_name = find_repository(args, desired, "restore")
    repo = open_repository(desired.repositories[repo_name])
    with repo.lock(purpose=f"restore of {args.vm}"):
        # --overwrite --host H: the VM to overwrite is known only on H; its own points are chosen there
        own_points = (
            args.overwrite and args.host and args.point == "latest" and args.from_host in (None, args.host)
        )
        point: RestorePoint | None = None
        if not own_points:
            try:
                point = find_point(repo, args.vm, args.point, host=args.from_host)
            except RestoreError as exc:
                hint = ""
                if isinstance(exc, AmbiguousVmError) and args.overwrite and not args.host:
                    hint = "; with --overwrite, --host HOST overwrites the VM on HOST from its own points"
                fail(
                    f"{exc}{hint}", "ambiguous" if isinstance(exc, AmbiguousVmError) else "no-point", "usage"
                )
        host_name = str(args.host or (point.vm.host if point is not None else ""))
        if host_name not in desired.hosts:
            _usage(f"no Host named {host_name!r} in the config")
        progress = Progress(operation="restore")
        options = RestoreOptions(
            name=args.name,
            datastore=args.datastore,
            keep_identity=args.keep_identity,
            power_on=args.power_on,
            progress=progress,
        )
        with connect(desired.host(host_name)) as host, sigterm_raises():
            try:
                if args.overwrite:
                    return _overwrite(args, host, repo, point, options, progress)
                assert point is not None
                print(describe_point(point))
                for vm in host.list_vms():
                    if vm.name == args.vm and (journal := unfinished_overwrite(host, vm)) is not None:
                        _err(f"note: {journal.notice(vm, host.name)}")
                if args.test:
                    with progress:
                        tr = run_test_restore(host, repo, point, datastore=args.datastore, progress=progress)
                    print(printable(tr.message))
                    if args.json:
                        emit_json(
                            {
                                "ok": tr.ok,
                                "action": "test",
                                "point_id": tr.point_id,
                                "vm": tr.vm,
                                "host": tr.host,
                                "datastore": tr.datastore,
                                "power_state": tr.power_state,
                                "heartbeat": tr.heartbeat,
                                "seconds": round(tr.seconds, 3),
                                "error": tr.error,
                            }
                        )
                    return ExitCode.OK if tr.ok else ExitCode.FAILED
                with progress:
                    result = restore_new_vm(host, repo, point, options)
                print(
                    f"restored as new VM '{printable(result.vm_name)}' (vmid {result.vmid})"
                    f" at {printable(result.vmx_path)}"
                )
                for d in result.disks:
                    print(printable(f"  {d.label} ({d.node}): {d.descriptor} {d.check_line()}"))
                if result.powered_on:
                    print("  powered on")
                if args.json:
                    emit_json(_result("new-vm", point, result))
                return ExitCode.OK
            except OverwriteFailed as exc:
                if isinstance(exc.__cause__, (KeyboardInterrupt, SystemExit)):
                    _err(f"FAILED: {exc}")
                    raise exc.__cause__ from None  # stopped by a signal: exit as such, after saying where
                fail(f"FAILED: {exc}", "restore-failed")
            except RestoreError as exc:
                fail(str(exc), "restore-failed")
            except (FormatError, MissingObjectError) as exc:  # a damaged or missing object of the point
                which = f"restore point {point.id} of {point.vm.name}" if point is not None else "the restore"
                log.error("restore.failed", error=str(exc), error_type=exc.__class__.__name__)
                fail(
                    f"{printable(which)}: {exc}; 'esxi-reconciler verify {repo_name}' names every damaged"
                    " point (an older point may be whole)",
                    "repository-damaged",
                )
            except Exception as exc:
                from reconciler.operations.failures import Failure, explain

                if isinstance(exc, Failure):
                    raise
                cfg = desired.host(host_name)
                explained = explain(exc, host=host_name, address=f"{cfg.address}:{cfg.api.port}")
                if explained is None:
                    raise
                log.error("restore.failed", error=explained.message)
                raise explained from exc


def _own_point(args: argparse.Namespace, repo: Repository, host: RestoreHost, target: VmInfo) -> RestorePoint:
    """With ``--overwrite --host``: the newest point of the VM being overwritten itself (this host, its
    UUID). None of its own: with ``--to-vm``, the one VM named VM (cross-VM, confirmed by name);
    else refused, listing what the repository has."""
    from reconciler.operations.restore import RestoreError, backed_up_vms, find_point

    try:
        return find_point(repo, args.vm, "latest", host=host.name, uuid=target.uuid or "")
    except RestoreError:
        if args.to_vm:
            return find_point(repo, args.vm, "latest", host=args.from_host)
    others = backed_up_vms(repo.list_points(vm=args.vm))
    name = shlex.quote(target.name)
    raise RestoreError(
        f"VM {target.name!r} on {host.name} (uuid {target.uuid or '?'}) has no restore point of its own;"
        f" the points named {args.vm!r} are of other VMs: "
        + "; ".join(c.describe() for c in others)
        + f". Nothing changed. To overwrite it with one of those anyway, name it: --point ID --to-vm {name}"
    )


def _overwrite(
    args: argparse.Namespace,
    host: RestoreHost,
    repo: Repository,
    point: RestorePoint | None,
    options: RestoreOptions,
    progress: Progress,
) -> int:
    from reconciler.operations.restore import (
        RestoreError,
        check_overwrite,
        describe_source,
        restore_overwrite,
        same_vm,
        unfinished_overwrite,
    )

    target_name = args.to_vm or args.vm
    matches = [v for v in host.list_vms() if v.name == target_name]
    if len(matches) != 1:
        fail(
            f"host {host.name} has {len(matches)} VMs named {target_name!r}, so there is nothing to"
            " overwrite; restore it as a new VM (without --overwrite, with --name if needed)",
            "no-target",
            "usage",
        )
    target = matches[0]
    try:
        if point is None:
            point = _own_point(args, repo, host, target)
        check_overwrite(point, host.name, target, other_vm=bool(args.to_vm))
    except RestoreError as exc:
        fail(str(exc), "refused", "usage")
    print(describe_point(point))
    other = not same_vm(point, host.name, target)
    if other:
        _say(
            f"  over a DIFFERENT VM: {target.name!r} on {host.name} (uuid {target.uuid or '?'}), which keeps"
            " its own UUIDs and MAC addresses"
        )
    earlier = unfinished_overwrite(host, target)
    if earlier is not None:
        _say(
            f"  {target.name!r} was left by an overwrite that did not finish (restore point {earlier.point},"
            f" it was {earlier.power_state or 'in an unknown state'} before): this one cleans up after it"
        )
    what = f"disk {args.disk!r} of" if args.disk else "the disks of"
    source = f" of a DIFFERENT VM, {describe_source(point)}" if other else f" of {describe_source(point)}"
    question = (
        f"Overwrite {what} VM {target.name!r} on {host.name} with restore point {point.id}{source}?"
        f" The VM will be powered off ({target.power_state} now)."
    )
    if not args.yes:
        if not sys.stdin.isatty():
            fail(f"{question} Not asked: no terminal; nothing changed (add --yes)", "not-confirmed", "usage")
        if not _confirm(question):
            fail("not confirmed; nothing changed", "declined")
    with progress:
        result = restore_overwrite(
            host, repo, point, target, options, disk=args.disk, other_vm=bool(args.to_vm)
        )
    count = plural(len(result.disks), "disk")
    _say(f"overwrote {count} of {result.vm_name} on {host.name} (each disk checked)")
    for d in result.disks:
        _say(f"  {d.label} ({d.node}): {d.descriptor} {d.check_line()}")
    if result.powered_on:
        print("  powered on")
    elif result.power_state_before == "poweredOn":
        _say(
            f"  left powered off (it was on before; --power-on starts it after the restore): power it on once"
            f" checked, in the Host Client or with `vim-cmd vmsvc/power.on {result.vmid}` on {host.name}"
        )
    if args.json:
        emit_json(_result("overwrite", point, result))
    return ExitCode.OK


def _abort(args: argparse.Namespace, desired: DesiredState) -> int:  # noqa: C901  --abort's cases (no journal, one, several, on which host) each end with their own message
    """``--abort``: find the VM's unfinished overwrite (on ``--host``, else on every host) and give it up."""
    from reconciler.esxi.signals import sigterm_raises
    from reconciler.operations.hosts import connect
    from reconciler.operations.restore import OverwriteJournal, abort_overwrite, unfinished_overwrite

    name = args.to_vm or args.vm
    if args.host and args.host not in desired.hosts:
        _usage(f"no Host named {args.host!r} in the config")
    hosts = [args.host] if args.host else sorted(desired.hosts)
    seen: list[str] = []
    found: list[tuple[str, VmInfo, OverwriteJournal]] = []
    for host_name in hosts:
        try:
            with connect(desired.host(host_name)) as host:
                for vm in host.list_vms():
                    if vm.name == name:
                        seen.append(host_name)
                        if (journal := unfinished_overwrite(host, vm)) is not None:
                            found.append((host_name, vm, journal))
        except Exception as exc:
            if args.host:
                raise
            _err(f"host {host_name}: {exc}")
    if not found:
        if not seen:
            fail(f"no VM named {name!r} on {', '.join(hosts)}", "no-vm", "usage")
        _say(f"VM {name!r} on {', '.join(seen)}: no unfinished overwrite; nothing to abort")
        if args.json:
            emit_json({"ok": True, "action": "abort", "vm": name, "hosts": seen, "aborted": False})
        return ExitCode.OK
    if len(found) > 1:
        where = ", ".join(f"{h} (restore point {j.point})" for h, _, j in found)
        fail(
            f"several VMs named {name!r} have an unfinished overwrite: {where}; choose one with --host",
            "ambiguous",
            "usage",
        )
    host_name, vm, _ = found[0]
    with connect(desired.host(host_name)) as host, sigterm_raises():
        try:
            result = abort_overwrite(host, vm)
        except Exception as exc:
            from reconciler.operations.failures import explain

            explained = explain(exc, host=host_name)
            if explained is None:
                raise
            fail(f"FAILED to abort the overwrite of {name!r}: {explained}", explained.code)
    if result is None:
        _say(f"VM {name!r} on {host_name}: no unfinished overwrite; nothing to abort")
        if args.json:
            emit_json({"ok": True, "action": "abort", "vm": name, "hosts": [host_name], "aborted": False})
        return ExitCode.OK
    point = result.journal.point
    if result.switched:
        _say(
            f"the overwrite of VM {name!r} on {host_name} (restore point {point}) had already switched it to"
            " its restored disks (verified): it stays on them"
        )
        if result.kept:
            print("  the files it replaced are still in the VM's folder; delete them once the VM is checked:")
            for f in result.kept:
                _say(f"    {f}")
    else:
        _say(
            f"gave up the overwrite of VM {name!r} on {host_name} (restore point {point});"
            " the VM is on its original disks, as it was"
        )
        for f in result.removed:
            _say(f"  removed {f}")
    before = result.journal.power_state
    if result.powered_on:
        print("  powered on again (as before the overwrite)")
    else:
        _say(f"  {result.vm.power_state} (it was {before or 'in an unknown state'} before the overwrite)")
    if args.json:
        emit_json(
            {
                "ok": True,
                "action": "abort",
                "vm": name,
                "hosts": [host_name],
                "aborted": True,
                "point_id": point,
                "switched": result.switched,
                "removed": result.removed,
                "kept": result.kept,
                "powered_on": result.powered_on,
            }
        )
    return ExitCode.OK
