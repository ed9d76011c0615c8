"""Build the Go host process ``esxisim-host`` from ``esxisim/gosim``, again only when its sources change.

The build is offline: Debian's ``golang-go`` and ``golang-github-vmware-govmomi-dev`` in GOPATH mode::

    cd esxisim/gosim && GO111MODULE=off GOPATH=/usr/share/gocode go build -o esxisim/build/esxisim-host .

A stamp file next to the binary holds the hash of the sources and of ``go version``; a lock file makes
concurrent callers (the CLI, pytest workers) wait for one build instead of racing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from esxisim import PACKAGE_DIR

GOSIM_DIR = PACKAGE_DIR / "gosim"
BUILD_DIR = PACKAGE_DIR / "build"
BINARY = BUILD_DIR / "esxisim-host"
STAMP = BUILD_DIR / "esxisim-host.stamp"
GOPATH = Path("/usr/share/gocode")
GOVMOMI_SIMULATOR = GOPATH / "src/github.com/vmware/govmomi/simulator"
SOURCE_SUFFIXES = frozenset({".go", ".s", ".c", ".h"})


class BuildError(RuntimeError):
    """The Go binary cannot be built (toolchain or govmomi missing, compile error)."""


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError("the Go toolchain is missing: 'go' is not on PATH (apt-get install golang-go)")
    if not GOVMOMI_SIMULATOR.is_dir():
        raise BuildError(
            f"govmomi is missing: {GOVMOMI_SIMULATOR} does not exist "
            "(apt-get install golang-github-vmware-govmomi-dev)"
        )
    return go


def _sources() -> list[Path]:
    if not GOSIM_DIR.is_dir():
        raise BuildError(f"no Go sources: {GOSIM_DIR} does not exist")
    files = sorted(
        p
        for p in GOSIM_DIR.rglob("*")
        if p.is_file() and p.suffix in SOURCE_SUFFIXES and not p.name.endswith("_test.go")
    )
    if not any(p.suffix == ".go" for p in files):
        raise BuildError(f"no Go sources: {GOSIM_DIR} holds no .go file")
    return files


def source_hash(go: str) -> str:
    """Return the hash of the Go sources (paths and contents) and of the toolchain version."""
    digest = hashlib.sha256()
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout
    digest.update(version.encode())
    for path in _sources():
        digest.update(str(path.relative_to(GOSIM_DIR)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _env() -> dict[str, str]:
    env = dict(os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOFLAGS="")
    if "GOCACHE" not in env and "HOME" not in env and "XDG_CACHE_HOME" not in env:
        env["GOCACHE"] = str(BUILD_DIR / "go-cache")
    return env


def ensure_built(*, force: bool = False, quiet: bool = True) -> Path:
    """Return the path of an up-to-date ``esxisim-host`` binary, building it if needed."""
    go = _go()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with (BUILD_DIR / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = source_hash(go)
        if not force and BINARY.is_file() and STAMP.is_file() and STAMP.read_text().strip() == wanted:
            return BINARY
        if not quiet:
            print(f"esxisim: building {BINARY} ...", file=sys.stderr, flush=True)
        tmp = BINARY.with_name(BINARY.name + ".tmp")
        proc = subprocess.run(
            [go, "build", "-o", str(tmp), "."],
            cwd=GOSIM_DIR,
            env=_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(
                f"go build failed in {GOSIM_DIR} (exit {proc.returncode}):\n{proc.stderr.strip()}"
            )
        tmp.replace(BINARY)
        STAMP.write_text(wanted + "\n")
        return BINARY


def main() -> int:
    """``python -m esxisim.build [--force]``: build the binary and print its path."""
    try:
        path = ensure_built(force="--force" in sys.argv[1:], quiet=False)
    except BuildError as exc:
        print(f"esxisim: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
