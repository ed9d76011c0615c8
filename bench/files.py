"""Reading a restore point through ``esxi-reconciler mount`` vs ``restic mount`` of the same data: time to
first byte (mount ready → the first 128 KiB of the file) and throughput of reading the whole file
sequentially in 1 MiB reads, each on a fresh mount (cold: no decoded chunk cached, page cache of the
mount dropped with the mount). Run as root:

    .venv/bin/python -m bench.files [--size 1G] [--seed 1]

The source is the benchmark disk image of :mod:`bench.backup` (a realistic mix of binary-like,
compressible and zero data). It is stored once in our repository (through the chunk writer, as a
backup stores it) and once with ``restic backup``; the mount of ours runs
:func:`reconciler.operations.mount.serve` in a child process (what the ``mount`` verb runs, without a
config). The file read back is compared with the source (SHA-256) outside the timed window.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.backup import PASSPHRASE, MiB, image_for, machine, versions, write_bench_point
from esxisim.lab import parse_size

_SERVE = """
import sys
from pathlib import Path
from reconciler.operations.mount import build_tree, serve
from reconciler.repository import Repository
repo = Repository.open(sys.argv[1], sys.argv[2])
serve(repo, build_tree(repo.list_points()), Path(sys.argv[3]))
"""


def store(root: Path, src: Path, size: int) -> Path:
    """Our repository with one point whose one disk is ``src``."""
    from reconciler.repository import Repository

    repo_path = root / "repo"
    repo = Repository.init(repo_path, PASSPHRASE)
    writer = repo.chunk_writer(size)
    with src.open("rb") as f:
        offset = 0
        while piece := f.read(MiB):
            if piece.count(0) != len(piece):
                writer.write(offset, piece)
            offset += len(piece)
    index = writer.finish()
    vmx = repo.write_file("bench.vmx", b'scsi0:0.fileName = "bench.vmdk"\n')
    write_bench_point(repo, index, size, (vmx,))
    repo.flush()
    return repo_path


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"mount exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


def read_through(
    argv: list[str], mountpoint: Path, relative: str, env: dict[str, str] | None = None
) -> dict[str, float | str]:
    """Mount, then time the first 128 KiB and the whole file; unmount."""
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    try:
        t_mount = time.perf_counter()
        path = mountpoint / relative
        wait_for(path, proc)
        ready = time.perf_counter() - t_mount
        t0 = time.perf_counter()
        with path.open("rb", buffering=0) as f:
            first = f.read(128 * 1024)
            ttfb = time.perf_counter() - t0
            digest = hashlib.sha256(first)
            total = len(first)
            while piece := f.read(MiB):
                digest.update(piece)
                total += len(piece)
        seconds = time.perf_counter() - t0
        return {
            "ready_s": ready,
            "ttfb_s": ttfb,
            "seconds": seconds,
            "mbps": total / seconds / 1e6,
            "sha256": digest.hexdigest(),
        }
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1G")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp/esxi-reconciler-bench"))
    args = parser.parse_args()
    size = parse_size(args.size)
    src, kinds = image_for(args.cache, size, args.seed)
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    results: dict[str, object] = {"machine": machine(), "size": size, "kinds": kinds, "tools": versions()}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        repo = store(root, src, size)
        print(f"stored in our repository in {time.perf_counter() - t0:.1f}s", flush=True)
        ours = read_through(
            [sys.executable, "-c", _SERVE, str(repo), PASSPHRASE, str(root / "mnt")],
            root / "mnt",
            "vms/bench/latest/bench.img",
        )
        ours["identical"] = ours.pop("sha256") == expected
        results["esxi-reconciler mount"] = ours
        print("esxi-reconciler mount:", json.dumps(ours), flush=True)
        if shutil.which("restic"):
            env = {
                "RESTIC_PASSWORD": PASSPHRASE,
                "RESTIC_REPOSITORY": str(root / "restic-repo"),
                "RESTIC_CACHE_DIR": str(root / "restic-cache"),
            }
            subprocess.run(["restic", "init"], env={**os.environ, **env}, check=True, capture_output=True)
            subprocess.run(
                ["restic", "backup", str(src)], env={**os.environ, **env}, check=True, capture_output=True
            )
            theirs = read_through(
                ["restic", "mount", str(root / "rmnt")],
                root / "rmnt",
                f"snapshots/latest{src}",
                env,
            )
            theirs["identical"] = theirs.pop("sha256") == expected
            results["restic mount"] = theirs
            print("restic mount:", json.dumps(theirs), flush=True)
        else:
            results["restic mount"] = "restic is not installed"
            print("restic is not installed: no comparison", flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
