"""``make install DESTDIR=…`` installs the expected files (FHS paths, the program runnable from them
without the development virtualenv) and ``make uninstall`` removes every one of them.

Slow (about a minute): it installs the program's dependencies from the package index, as a package
build would."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}
"""No virtualenv, no PYTHONPATH: the installed program must stand on its own."""


def make(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


@pytest.fixture(scope="module")
def destdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("destdir")
    make("install", f"DESTDIR={root}")
    return root


def test_install_puts_the_expected_files_in_fhs_places(destdir: Path) -> None:
    installed = files_under(destdir)
    private = {f for f in installed if f.startswith("usr/lib/esxi-reconciler/")}
    examples = {str(p.relative_to(REPO)) for p in (REPO / "config.example").rglob("*") if p.is_file()}
    schemas = {p.name for p in (REPO / "reconciler" / "schemas").glob("*.schema.json")}
    assert installed - private == {
        "usr/bin/esxi-reconciler",
        "usr/lib/systemd/system/esxi-reconciler.service",
        "usr/share/bash-completion/completions/esxi-reconciler",
        "usr/share/zsh/vendor-completions/_esxi-reconciler",
        "usr/share/man/man1/esxi-reconciler.1",
        "usr/share/esxi-reconciler/esxi-reconciler.service.d/local.conf.example",
        *(f"usr/share/esxi-reconciler/schemas/{name}" for name in schemas),
        *(f"usr/share/esxi-reconciler/{name}" for name in examples),
    }
    lib = "usr/lib/esxi-reconciler/"
    assert {f"{lib}reconciler/cli.py", f"{lib}reconciler/py.typed"} <= private
    assert {f"{lib}reconciler/schemas/{name}" for name in schemas} <= private  # package data
    for dependency in ("cryptography", "paramiko", "pyVmomi", "yaml", "zstandard", "structlog", "shtab"):
        assert any(f.startswith(f"{lib}{dependency}/") for f in private), dependency
    assert not any(f.startswith(f"{lib}bin/") for f in private)  # the dependencies' own scripts
    assert (destdir / "usr/bin/esxi-reconciler").stat().st_mode & 0o777 == 0o755


def test_the_installed_program_runs_on_its_own(destdir: Path) -> None:
    program = destdir / "usr/bin/esxi-reconciler"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(program), *args], capture_output=True, text=True, timeout=120, env=CLEAN_ENV, check=False
        )

    version = run("--version")
    assert (version.returncode, version.stdout) == (0, "esxi-reconciler 0.1.0\n"), version.stderr
    example = destdir / "usr/share/esxi-reconciler/config.example"
    valid = run("validate", str(example))
    assert valid.returncode == 0 and valid.stdout.startswith("OK: 2 hosts, 2 repositories"), valid.stderr
    path = run("schema", "host", "--path")
    assert path.stdout.strip() == str(destdir / "usr/lib/esxi-reconciler/reconciler/schemas/host.schema.json")
    # the example's yaml-language-server modelines point at the installed schemas
    for yaml in example.rglob("*.yaml"):
        modeline = re.match(r"# yaml-language-server: \$schema=(\S+)", yaml.read_text().splitlines()[0])
        assert modeline is not None, yaml
        assert (
            yaml.parent / modeline.group(1)
        ).resolve().parent == destdir / "usr/share/esxi-reconciler/schemas"


def test_the_unit_completion_and_man_page_fit_the_installed_program(destdir: Path) -> None:
    unit = (destdir / "usr/lib/systemd/system/esxi-reconciler.service").read_text()
    assert re.search(r"^ExecStart=/usr/bin/esxi-reconciler run ", unit, re.MULTILINE)
    subprocess.run(
        ["bash", "-n", str(destdir / "usr/share/bash-completion/completions/esxi-reconciler")], check=True
    )
    shown = subprocess.run(
        ["man", "--warnings", "-l", str(destdir / "usr/share/man/man1/esxi-reconciler.1")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**CLEAN_ENV, "MANWIDTH": "100"},
        check=False,
    )
    assert shown.returncode == 0 and shown.stderr == "" and "repo key passwd" in shown.stdout


def test_every_path_follows_prefix() -> None:
    planned = make("-n", "install", "PREFIX=/usr/local", "DESTDIR=/stage").stdout
    targets = set(re.findall(r"'(/stage[^' ]*)'", planned))
    assert targets and all(t.startswith("/stage/usr/local/") for t in targets), targets
    assert "s|/usr/bin/esxi-reconciler|/usr/local/bin/esxi-reconciler|" in planned  # the unit's ExecStart


def test_uninstall_removes_every_installed_file(destdir: Path) -> None:
    make("uninstall", f"DESTDIR={destdir}")
    assert files_under(destdir) == set()
    # what is left are the standard directories install -D created on the way (on a real system they
    # belong to others), and nothing of ours
    left = {str(p.relative_to(destdir)) for p in destdir.rglob("*")}
    assert not any("esxi-reconciler" in p for p in left), left
