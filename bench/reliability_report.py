"""The reliability suite's figures as a table (``docs/reliability.md`` holds the latest).

    .venv/bin/python -m bench.reliability_report            # table of the last run's ledger
    .venv/bin/python -m bench.reliability_report --run      # run tests/reliability first
    .venv/bin/python -m bench.reliability_report --run --long --markdown

``--long`` sets ``RELIABILITY_LONG=1`` (the long fuzz and load variants). The exit status is 1 when a
case failed or a figure that must stay 0 (snapshots or temporary VMs left, points lost, secrets found)
is not 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tests.reliability.ledger import FIGURES, Totals, ledger_path, totals

MUST_BE_ZERO = ("snapshots_left", "temporary_vms_left", "points_lost", "secrets_found")

LABELS = {
    "cases": "cases (passed / failed / skipped)",
    "faults_injected": "faults injected",
    "kill_points": "kill points (SIGKILL at a chosen step)",
    "hostile_inputs": "hostile inputs",
    "fuzz_inputs": "fuzz inputs",
    "points_verified": "restore points verified after a fault",
    "snapshots_left": "snapshots left on a host",
    "temporary_vms_left": "temporary VMs left on a host",
    "points_lost": "restore points lost",
    "secrets_found": "secrets found in clear",
}


def rows(t: Totals) -> list[tuple[str, str]]:
    out = [(LABELS["cases"], f"{t.cases} ({t.passed} / {t.failed} / {t.skipped})")]
    for figure in FIGURES:
        value = str(t.figures[figure]) if figure in t.touched else "not measured"
        out.append((LABELS[figure], value))
    return out


def render(t: Totals, markdown: bool) -> str:
    table = rows(t)
    if markdown:
        lines = ["| figure | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in table]
        return "\n".join(lines)
    width = max(len(name) for name, _ in table)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", action="store_true", help="run tests/reliability first")
    parser.add_argument("--long", action="store_true", help="with --run: the long variants too")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    parser.add_argument("--ledger", type=Path, default=None, help="ledger file (default: the suite's)")
    args = parser.parse_args(argv)
    path = args.ledger or ledger_path()
    if args.run:
        env = dict(os.environ, RELIABILITY_LEDGER=str(path))
        if args.long:
            env["RELIABILITY_LONG"] = "1"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/reliability"], env=env, check=False)
    t = totals(path)
    print(render(t, args.markdown))
    bad = t.failed > 0 or any(t.figures[f] for f in MUST_BE_ZERO) or t.cases == 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
