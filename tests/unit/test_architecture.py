"""The layers are real: the import contracts in pyproject.toml hold, each of their exceptions is still
needed, a violation is caught (standard-library modules too), and importing the pure code loads no
I/O code (docs/architecture.md "Layers")."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PYPROJECT = ROOT / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

IO_LIBRARIES = (
    *("pyVmomi", "pyVim", "paramiko", "urllib3", "cryptography", "zstandard", "sqlite3", "watchdog"),
    *("yaml", "jsonschema", "subprocess", "socket", "apprise", "smtplib", "prometheus_client"),
)
IO_PACKAGES = (
    *("reconciler.esxi", "reconciler.repository", "reconciler.operations", "reconciler.status.store"),
    *("reconciler.config.loader", "reconciler.config.revision", "reconciler.daemon", "reconciler.commands"),
    *("reconciler.gitsource", "reconciler.config.source", "reconciler.web.read", "reconciler.web.server"),
)


def lint_imports(config: Path, *, tree: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with ``config`` over the ``reconciler`` package found in ``tree``."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(config)],
        cwd=tree,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def exception_lines() -> list[str]:
    """Every exception written in the contracts (an ``"importer -> imported"`` line)."""
    return re.findall(r'^\s*"([\w.]+ -> [\w.]+)",\s*$', PYPROJECT.read_text(encoding="utf-8"), re.M)


def test_the_contracts_are_kept() -> None:
    result = lint_imports(PYPROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contracts_have_exceptions_to_check() -> None:
    assert len(exception_lines()) >= 2


@pytest.mark.parametrize("line", exception_lines())
def test_every_exception_is_needed(tmp_path: Path, line: str) -> None:
    """Without its exception line, the contract it belongs to breaks (the import it excuses exists)."""
    text = PYPROJECT.read_text(encoding="utf-8")
    config = tmp_path / "pyproject.toml"
    config.write_text(re.sub(rf'^\s*"{re.escape(line)}",\s*\n', "", text, flags=re.M), encoding="utf-8")
    assert config.read_text(encoding="utf-8") != text
    result = lint_imports(config)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        # a standard-library module is an external package to the contracts too
        ("operations/observe.py", "import sqlite3", "sqlite3 only inside status/"),
        ("facts/points.py", "import os", "Deciding does no I/O"),
        ("repository/chunks.py", "import paramiko", "pyVmomi, paramiko and urllib3 only inside esxi/"),
        ("esxi/vmx.py", "import zstandard", "the S3 client (boto3, botocore) only inside"),
        ("rules/schedule.py", "import reconciler.config.model", "Layers"),
        ("planning/plan.py", "import reconciler.esxi.host", "Layers"),
        ("operations/restore.py", "import reconciler.esxi.host", "The host seam"),
        ("commands/status.py", "from reconciler.esxi.shell import ShellSession", "The host seam"),
        ("repository/gc.py", "import reconciler.operations.progress", "Layers"),
        ("config/model.py", "import reconciler.config.loader", "No import cycle"),
        ("daemon/cycle.py", "import apprise", "apprise only inside notify/"),
        ("notify/rules.py", "import reconciler.notify.send", "Deciding what to notify does no I/O"),
        ("notify/rules.py", "import time", "Deciding what to notify does no I/O"),
        ("gitsource/sync.py", "import reconciler.daemon.loop", "Layers"),
        ("planning/approval.py", "import reconciler.gitsource.git", "Deciding does no I/O"),
        ("web/page.py", "import reconciler.web.read", "The status page is a pure function"),
        ("web/charts.py", "import os", "The status page is a pure function"),
        ("status/store.py", "import prometheus_client", "prometheus-client only inside web/"),
        ("web/server.py", "import reconciler.gitsource.sync", "Layers"),
    ],
)
def test_a_violation_is_caught(tmp_path: Path, module: str, statement: str, contract: str) -> None:
    shutil.copytree(ROOT / "reconciler", tmp_path / "reconciler", ignore=shutil.ignore_patterns("*.pyc"))
    target = tmp_path / "reconciler" / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{statement}\n", encoding="utf-8")
    result = lint_imports(PYPROJECT, tree=tmp_path)
    assert result.returncode != 0 and "Broken contracts" in result.stdout, result.stdout
    assert contract in result.stdout.split("Broken contracts", 1)[1], result.stdout


@pytest.mark.parametrize(
    "module",
    [
        "reconciler.planning.plan",
        "reconciler.planning.render",
        "reconciler.planning.fingerprint",
        "reconciler.planning.backup_mode",
        "reconciler.planning.approval",
        "reconciler.planning.review",
        "reconciler.status.conditions",
        "reconciler.notify.rules",
        "reconciler.web.page",
        "reconciler.status.source",
        "reconciler.rules.schedule",
        "reconciler.rules.retention",
        "reconciler.rules.durations",
        "reconciler.facts.inventory",
        "reconciler.facts.points",
        "reconciler.printable",
    ],
)
def test_importing_pure_code_loads_no_io_code(module: str) -> None:
    """In a fresh interpreter: no module of the I/O packages, no I/O library."""
    code = f"import importlib, sys; importlib.import_module({module!r}); print('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(result.stdout.split())
    assert module in loaded
    ours = sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in IO_PACKAGES))
    libraries = sorted(m for m in loaded if m.split(".")[0] in IO_LIBRARIES)
    assert ours == [] and libraries == []


def test_the_host_ports_load_no_host_library() -> None:
    """The Protocols the operations depend on (and the values they name) load neither pyVmomi, paramiko
    nor urllib3, nor the host layer's sessions: a test fake needs none of them."""
    module = "reconciler.operations.ports"
    code = f"import importlib, sys; importlib.import_module({module!r}); print('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(result.stdout.split())
    assert module in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("pyVmomi", "pyVim", "paramiko", "urllib3")) == []
    sessions = (
        "reconciler.esxi.host",
        "reconciler.esxi.api",
        "reconciler.esxi.shell",
        "reconciler.esxi.transport",
    )
    assert sorted(loaded.intersection(sessions)) == []


@pytest.mark.parametrize("module", ["reconciler.rules.schedule", "reconciler.facts.points"])
def test_rules_and_facts_load_nothing_else_of_ours(module: str) -> None:
    """The bottom layer: standard library and its own package only."""
    code = f"import importlib, sys; importlib.import_module({module!r}); print('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    package = module.rsplit(".", 1)[0]
    ours = {m for m in result.stdout.split() if m.startswith("reconciler")}
    assert ours <= {"reconciler", package} | {m for m in ours if m.startswith(package + ".")}
