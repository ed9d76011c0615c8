"""``esxi-reconciler verify``: prove the restore points of a repository can be read back."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    emit_json,
    fail,
    load_desired,
    plural,
    unknown_name,
)
from reconciler.printable import printable
from reconciler.units import human_size

if TYPE_CHECKING:
    from reconciler.repository.verify import VerifyReport

log = structlog.get_logger("reconciler.cli")


_VERIFY_EXAMPLES = """\
examples:
  esxi-reconciler verify                    check every configured repository, reading all data
  esxi-reconciler verify nas --no-read-data
                                            structure only: manifests, indexes, chunks present
  esxi-reconciler verify nas --read-data-subset 10%
                                            read a random tenth of the chunks
  esxi-reconciler verify nas --read-data-subset 2/7
                                            read slice 2 of 7 (7 runs, 1/7 .. 7/7, read everything)
  esxi-reconciler verify --json             machine-readable report
  esxi-reconciler verify nas --repair       also set bad chunks aside, so the next backups store
                                            that data again (repairing the points where they can)

Exit 0 healthy; 1 damage found (the restore points affected are named) or a repository could
not be verified (locked by GC, not mounted, wrong passphrase: the cause is named).
"""


def _subset(text: str) -> tuple[int, int] | float:
    from reconciler.repository.verify import parse_subset

    try:
        return parse_subset(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "verify",
        help="check that every restore point of a repository can be restored",
        description="Check repositories (default: every configured one): every restore point's manifest,\n"
        "indexes and digest maps decode and fit, every chunk they need exists and -- unless\n"
        "--no-read-data -- decrypts, decompresses and matches its id. Runs beside backups (shared\n"
        "lock); each problem names the restore points it breaks.",
        epilog=_VERIFY_EXAMPLES,
        handler=cmd_verify,
    )
    parser.add_argument(
        "repositories", metavar="REPOSITORY", nargs="*", help="names of Repository documents (default: all)"
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--read-data-subset",
        metavar="n/t|P%",
        type=_subset,
        help="read only part of the data: slice n of t of the chunk ids (t runs cover all), or a random P%%",
    )
    data.add_argument(
        "--no-read-data", action="store_true", help="check structure and chunk presence, read no chunk data"
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="set bad chunks aside (quarantine/) so that the next backup of each affected VM reads in full"
        " and stores that data again (what the daemon's scheduled verifications do)",
    )


def cmd_verify(args: argparse.Namespace) -> int:
    """``esxi-reconciler verify``: 0 healthy, 1 damage or not verifiable, 64 bad input."""
    from reconciler.config.secrets import SecretError
    from reconciler.operations.progress import Progress
    from reconciler.operations.repositories import open_repository
    from reconciler.repository.errors import RepositoryError
    from reconciler.repository.verify import verify_repository

    desired = load_desired(args)
    names: list[str] = args.repositories or sorted(desired.repositories)
    for name in names:
        if name not in desired.repositories:
            unknown_name("verify", "Repository", name, sorted(desired.repositories))
    if not names:
        fail("no repositories configured", "no-repositories", "config")
    subset = args.read_data_subset
    percent = 0.0 if args.no_read_data else subset if isinstance(subset, float) else 100.0
    slice_ = subset if isinstance(subset, tuple) else None

    results: list[dict[str, Any]] = []
    status = ExitCode.OK
    for name in names:
        cfg = desired.repositories[name]
        entry: dict[str, Any] = {"repository": name, "path": cfg.backend.location}
        try:
            repo = open_repository(cfg)
            with Progress(tty=None if not args.json else False, operation="verify") as progress:
                report = verify_repository(
                    repo, read_data_percent=percent, subset=slice_, progress=progress, quarantine=args.repair
                )
        except (SecretError, RepositoryError, OSError) as error:
            log.error("verify.failed", repository=name, error=str(error))
            entry.update({"ok": False, "error": str(error)})
            why = str(error) if name in str(error) else f"repository {name}: {error}"
            print(f"esxi-reconciler verify: not verified: {printable(why)}", file=sys.stderr)
            status = ExitCode.FAILED
            results.append(entry)
            continue
        entry.update(report.to_dict())
        entry["error"] = None
        results.append(entry)
        if not report.ok:
            status = ExitCode.FAILED
        if not args.json:
            _print_report(name, report)
    if args.json:
        emit_json({"ok": status == 0, "repositories": results})
    return status


def _print_report(name: str, report: VerifyReport) -> None:
    read = f"{report.chunks_read} read ({human_size(report.bytes_read)})"
    counts = f"{plural(report.points, 'restore point')}, {plural(report.chunks, 'chunk')} present, {read}"
    if report.ok:
        print(f"repository {name}: OK: {counts}")
        return
    if report.cancelled and not report.problems:
        print(f"repository {name}: INCOMPLETE (cancelled): {counts}")
        return
    problems = plural(len(report.problems), "problem")
    affected = plural(len(report.damaged_points), "restore point")
    print(f"repository {name}: DAMAGED: {problems}, {affected} affected; {counts}")
    for problem in report.problems:
        print(f"  {printable(problem.message)}")
    print("  restore points that cannot be fully restored:")
    for point_id, label in sorted(report.damaged_points.items()):
        print(f"    {point_id}  {printable(label)}" if label != point_id else f"    {point_id}")
    if report.quarantined:
        print(
            f"  {plural(report.quarantined, 'bad chunk')} set aside in quarantine/: the next backup of each"
            " affected VM reads its disks in full and stores the data again, which repairs these points"
            " where the VM still holds that data"
        )
