"""Backup benchmark: full and incremental (after a ~1 % day of scattered guest writes) through the
product's CLI against the lab, on the licensed (CBT) and free (digest-compare) paths, next to restic
and borg backing up the same disk image. Run as root (the lab needs it):

    .venv/bin/python -m bench.backup [--size 4G] [--seed 1] [--borg-compression lz4] [--rss-sweep]

The disk is a seeded generated raw image (cached under ``--cache``): extents of 64 KiB–64 MiB at
64 KiB alignment, 35 % never written (holes), 25 % text-like (hex text, zstd ~2x, no duplicates), 25 %
binary-like (:data:`BINARY_TABLE`, zstd ~1.4x) and 15 % random. Both simulated hosts get that image
as their VM's disk; the guest writes use the same seed on both hosts, so both see the same changed
bytes. restic and borg back up a copy of the free host's flat file taken before and after the writes
(same file name, so their second run is their incremental).

Every backup (product, restic, borg) is a child process; its wall time is the process's, its peak RSS
is the child's VmHWM (sampled from /proc). Bytes read on the host and bytes over the network come
from the restore point (``DiskRecord.bytes_read``/``bytes_sent``); repository growth is the change of
the repository directory's apparent size.

``--rss-sweep`` instead runs only full backups of both product paths at 1, 4 and 8 GiB and prints
peak RSS per size (no restic/borg). ``--json PATH`` writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esxisim.handle import LabHandle
from esxisim.lab import DatastoreSpec, DiskSpec, HostSpec, Lab, VMSpec, parse_size

if TYPE_CHECKING:
    from reconciler.facts.points import StoredFile
    from reconciler.repository import Repository

MiB = 1 << 20
GiB = 1 << 30
ALIGN = 64 * 1024
PASSPHRASE = "bench passphrase, not a secret"
ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / ".venv" / "bin" / "esxi-reconciler")
FREE, LICENSED = "esxi1", "esxi2"
VM = {FREE: "bench-free", LICENSED: "bench-cbt"}
PROFILE_DIR = os.environ.get("BENCH_PYSPY_DIR")
"""When set, each product backup runs under ``py-spy record`` (raw collapsed stacks go there)."""


# -- the disk image -----------------------------------------------------------------------------------


BINARY_TABLE = bytes(0 if b < 96 else b for b in range(256))
"""Bytes of "binary-like" extents: uniform random bytes with the lowest 96 values mapped to zero, so
37.5 % zeros scattered singly and the rest uniform (5.5 bits of entropy a byte): few long matches,
compressible only by entropy coding, like executables, database pages or VM memory (zstd level 1:
about 1.4x). The hardest mix for a compressor's speed."""

KINDS = (("hole", 0.35), ("text", 0.25), ("binary", 0.25), ("random", 0.15))
"""The benchmark disk: 35 % never written, 25 % text-like (hex), 25 % binary-like, 15 % random."""


def pick_kind(x: float) -> str:
    """The extent kind for a uniform ``x`` in [0, 1), by the shares of :data:`KINDS`."""
    for name, share in KINDS:
        if x < share:
            return name
        x -= share
    return KINDS[-1][0]


def make_image(path: Path, size: int, seed: int) -> dict[str, int]:
    """Write the seeded image (sparse: holes are never written); return bytes per extent kind."""
    rnd = random.Random(seed)
    kinds = {name: 0 for name, _ in KINDS}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(size - pos, rnd.randrange(1, 1025) * ALIGN)  # 64 KiB .. 64 MiB
            kind = pick_kind(rnd.random())
            if kind != "hole":
                f.seek(pos)
                done = 0
                while done < n:
                    m = min(16 * MiB, n - done)
                    if kind == "random":
                        f.write(rnd.randbytes(m))
                    elif kind == "binary":
                        f.write(rnd.randbytes(m).translate(BINARY_TABLE))
                    else:
                        f.write(rnd.randbytes(m // 2).hex().encode())
                    done += m
            kinds[kind] += n
            pos += n
    tmp.rename(path)
    return kinds


def image_for(cache: Path, size: int, seed: int) -> tuple[Path, dict[str, int]]:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"disk-{size // MiB}M-seed{seed}-mix2.raw"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, json.loads(meta.read_text())
    t0 = time.perf_counter()
    kinds = make_image(path, size, seed)
    meta.write_text(json.dumps(kinds))
    print(f"generated {path} in {time.perf_counter() - t0:.1f}s: {kinds}", flush=True)
    return path, kinds


# -- children -------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_rss: int
    """bytes (VmHWM of the child)"""
    output: str
    cpu: float
    """user + system seconds of the child"""


def run_child(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """Run ``argv`` after a ``sync``; peak RSS is the child's VmHWM sampled from /proc every 10 ms
    (``ru_maxrss`` would include the pre-exec copy of this big parent process)."""
    os.sync()  # the previous step's dirty pages are not this run's writeback to wait for
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    hwm = [0]
    done = threading.Event()

    def sample() -> None:
        # Not proc.poll(): it would reap the child before the os.wait4 below, which needs its rusage.
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    thread.join()
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {proc.returncode}:\n{text[-3000:]}")
    return Run(seconds, hwm[0], text, rusage.ru_utime + rusage.ru_stime)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the product ------------------------------------------------------------------------------------


def write_bench_point(repo: Repository, index: str, size: int, files: tuple[StoredFile, ...] = ()) -> None:
    """Record a one-disk restore point of the VM "bench" whose disk is the chunk index ``index``: how the
    benches that store an image without a lab (files, s3) make a point to read back."""
    from datetime import datetime, timezone

    from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id

    now = datetime.now(timezone.utc)
    repo.write_point(
        RestorePoint(
            id=new_point_id(now),
            policy="bench",
            vm=VmRef("bench", "uuid-bench", "esxi1", "1"),
            started=now,
            snapshot_time=now,
            finished=now,
            status="success",
            mode="full",
            config_revision="bench",
            files=files,
            disks=(DiskRecord(2000, "Hard disk 1", "[ds] bench/bench.vmdk", size, index),),
        )
    )


def write_config(handle: LabHandle, root: Path, *, licensed_ssh: bool = True) -> Path:
    """The product's config for the lab: one repository and policy per host. ``licensed_ssh=False``:
    the licensed host without SSH (everything over the API and HTTPS, as a host with SSH off)."""
    from reconciler.repository import Repository

    cfg = root / "config"
    for sub in ("hosts", "repositories", "policies"):
        (cfg / sub).mkdir(parents=True)
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    key = secrets / "repo.key"
    key.write_text(PASSPHRASE)
    key.chmod(0o600)
    policies = []
    for name in (FREE, LICENSED):
        info = handle.host(name)
        ssh_off = ", enabled: false" if name == LICENSED and not licensed_ssh else ""
        pw = secrets / f"{name}.pw"
        pw.write_text(handle.password(name))
        pw.chmod(0o600)
        (cfg / "hosts" / f"{name}.yaml").write_text(
            f"""apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: {name}}}
spec:
  address: {info["api"]["host"]}
  credentials: {{user: root, password: {{file: {pw}}}}}
  api: {{port: {info["api"]["port"]}, thumbprint: "{info["api"]["thumbprint_sha256"]}"}}
  ssh: {{port: {info["ssh"]["port"]}, host_key: "{info["ssh"]["host_key_fingerprint"]}"{ssh_off}}}
"""
        )
        repo = root / f"repo-{name}"
        Repository.init(repo, PASSPHRASE)  # default (production) KDF cost and zstd level (1)
        (cfg / "repositories" / f"r-{name}.yaml").write_text(
            f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: r-{name}}}
spec:
  backend: {{type: local, path: {repo}}}
  encryption: {{enabled: true, key: {{file: {key}}}}}
"""
        )
        policies.append(
            f"""---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: p-{name}}}
spec:
  host: {name}
  repository: r-{name}
  vms: {{names: [{VM[name]}]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 30}}
"""
        )
    (cfg / "policies" / "p.yaml").write_text("".join(policies))
    return cfg


@dataclass
class Row:
    tool: str
    kind: str
    seconds: float
    logical: int
    host_read: int | None
    network: int | None
    repo_growth: int
    peak_rss: int
    mode: str = ""
    cpu: float = 0.0

    @property
    def mbps(self) -> float:
        return self.logical / self.seconds / 1e6


def product_backup(cfg: Path, root: Path, host: str, kind: str, capacity: int) -> Row:
    from reconciler.repository import Repository

    repo_dir = root / f"repo-{host}"
    before = tree_size(repo_dir)
    argv = [
        CLI,
        "--config",
        str(cfg),
        "--log-level",
        "warning",
        "--log-format",
        "json",
        "backup",
        f"p-{host}",
    ]
    if kind == "full":
        argv.append("--full")
    if PROFILE_DIR:
        out = Path(PROFILE_DIR) / f"{host}-{kind}.txt"
        argv = ["py-spy", "record", "--format", "raw", "--threads", "-r", "50", "-o", str(out), "--", *argv]
    run = run_child(argv)
    growth = tree_size(repo_dir) - before
    point = Repository.open(repo_dir, PASSPHRASE).list_points(policy=f"p-{host}")[-1]
    (disk,) = point.disks
    tool = "esxi-reconciler CBT (licensed)" if host == LICENSED else "esxi-reconciler digest (free)"
    return Row(
        tool,
        kind,
        run.seconds,
        capacity,
        disk.bytes_read,
        disk.bytes_sent,
        growth,
        run.peak_rss,
        point.mode,
        run.cpu,
    )


_DAEMON_CHILD = """
import json, sys, time
from reconciler.config import load_config
from reconciler.log import configure_logging
from reconciler.operations.backup import backup_policy

configure_logging("json", "warning")
desired = load_config(sys.argv[1])
for line in sys.stdin:
    t0 = time.perf_counter()
    results = backup_policy(desired, sys.argv[2])
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "ok": all(r.ok for r in results),
                      "modes": [r.mode for r in results]}), flush=True)
"""


def daemon_incremental(handle: LabHandle, cfg: Path, host: str, percent: float, seed: int) -> float:
    """The daemon's cost of one VM's incremental: one process (imports, config) runs the policy as the
    daemon's apply does (``backup_policy``), once to warm up (key derivation, imports, first
    connections; nothing changed), then after a guest write of ``percent`` again: that second call's
    wall time is the figure."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _DAEMON_CHILD, str(cfg), f"p-{host}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        answers = []
        for step in range(2):
            if step == 1:
                handle.client(host).guest_write(VM[host], percent, seed)
            os.sync()
            proc.stdin.write("backup\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            if not answer["ok"]:
                raise RuntimeError(f"daemon-style backup of {host} failed: {answer}")
            answers.append(answer)
    finally:
        proc.stdin.close()
        proc.wait()
    return float(answers[1]["seconds"])


# -- restic and borg -------------------------------------------------------------------------------


def restic(root: Path, src: Path, kind: str) -> Row:
    repo = root / "restic-repo"
    env = {
        "RESTIC_PASSWORD": PASSPHRASE,
        "RESTIC_REPOSITORY": str(repo),
        "RESTIC_CACHE_DIR": str(root / "restic-cache"),
    }
    if kind == "full":
        run_child(["restic", "init"], env)
    before = tree_size(repo)
    run = run_child(["restic", "backup", str(src)], env)
    return Row(
        "restic",
        kind,
        run.seconds,
        src.stat().st_size,
        None,
        None,
        tree_size(repo) - before,
        run.peak_rss,
        "",
        run.cpu,
    )


def borg(root: Path, src: Path, kind: str, compression: str) -> Row:
    repo = root / "borg-repo"
    env = {"BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(root / "borg-base")}
    if kind == "full":
        run_child(["borg", "init", "--encryption", "repokey-blake2", str(repo)], env)
    before = tree_size(repo)
    run = run_child(["borg", "create", "--compression", compression, f"{repo}::{kind}", str(src)], env)
    return Row(
        f"borg ({compression})",
        kind,
        run.seconds,
        src.stat().st_size,
        None,
        None,
        tree_size(repo) - before,
        run.peak_rss,
        "",
        run.cpu,
    )


def copy_flat(handle: LabHandle, dst: Path) -> None:
    vm = handle.vm(FREE, VM[FREE])
    flat = handle.local_path(FREE, vm["disks"][0]["file"]).with_name(f"{VM[FREE]}-flat.vmdk")
    subprocess.run(["cp", "--sparse=always", str(flat), str(dst)], check=True)


def versions() -> dict[str, str]:
    out = {}
    for tool, arg in (("restic", "version"), ("borg", "--version")):
        try:
            out[tool] = subprocess.run([tool, arg], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            out[tool] = "missing"
    return out


def compile_product() -> None:
    """Byte-compile the product, as an installed copy is (pip and dh_python3 do): without ``.pyc``
    files, every run of the CLI compiled about 100 modules again (0.17 s) when the environment had
    ``PYTHONDONTWRITEBYTECODE`` set, which counted against the small incrementals."""
    import compileall

    compileall.compile_dir(str(ROOT / "reconciler"), quiet=1)


def machine() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "ram": f"{mem_kib / (1 << 20):.1f} GiB",
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# -- the run ----------------------------------------------------------------------------------------


def start_lab(image: Path, size: int) -> tuple[Lab, LabHandle]:
    hosts = []
    for name, lic in ((FREE, "free"), (LICENSED, "licensed")):
        disk = DiskSpec(size=size, fill=0.0, seed=1, image=str(image))
        vm = VMSpec(name=VM[name], disks=(disk,), cbt=lic == "licensed")
        hosts.append(
            HostSpec(name=name, license=lic, vms=(vm,), datastores=(DatastoreSpec("datastore1", 200 * GiB),))
        )
    lab = Lab(hosts=hosts, die_with_parent=True)
    t0 = time.perf_counter()
    lab.start()
    print(f"lab up in {time.perf_counter() - t0:.1f}s", flush=True)
    return lab, LabHandle(lab)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:,.1f} MB"


def table(rows: list[Row]) -> str:
    head = (
        "| tool | backup | mode | wall s | MB/s (logical) | read on host | over network | repo growth"
        " | peak RSS | client CPU s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r.tool} | {r.kind} | {r.mode or '–'} | {r.seconds:.2f} | {r.mbps:,.0f}"
            f" | {fmt_bytes(r.host_read)} | {fmt_bytes(r.network)} | {fmt_bytes(r.repo_growth)}"
            f" | {r.peak_rss / MiB:.0f} MiB | {r.cpu:.1f} |"
        )
    return "\n".join(lines)


def main_run(args: argparse.Namespace) -> dict[str, Any]:
    size: int = args.size
    image, kinds = image_for(Path(args.cache), size, args.seed)
    lab, handle = start_lab(image, size)
    root = Path(tempfile.mkdtemp(prefix="bench-backup-", dir=args.work))
    rows: list[Row] = []
    daemon: dict[str, float] = {}
    try:
        cfg = write_config(handle, root)
        src = root / "disk-flat.vmdk"
        copy_flat(handle, src)
        for host in (LICENSED, FREE):
            rows.append(product_backup(cfg, root, host, "full", size))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.skip_tools:
            rows.append(restic(root, src, "full"))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            rows.append(borg(root, src, "full", args.borg_compression))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        changed = {}
        for host in (LICENSED, FREE):
            ans = handle.client(host).guest_write(VM[host], args.percent, args.seed + 100)
            changed[host] = int(ans["bytes"])
        runs = sum(len(d["written"]) for d in ans["disks"])
        print(f"guest wrote {changed} bytes in {runs} runs", flush=True)
        copy_flat(handle, src)
        for host in (LICENSED, FREE):
            rows.append(product_backup(cfg, root, host, "incremental", size))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not args.skip_tools:
            rows.append(restic(root, src, "incremental"))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            rows.append(borg(root, src, "incremental", args.borg_compression))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        for host in (LICENSED, FREE):  # after restic and borg: these writes are not in their copy
            daemon[host] = daemon_incremental(handle, cfg, host, args.percent, args.seed + 200)
            print(f"daemon per-VM incremental {host}: {daemon[host]:.2f}s", flush=True)
    finally:
        handle.close()
        lab.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "size": size,
        "kinds": kinds,
        "changed": changed[FREE],
        "write_runs": runs,
        "rows": rows,
        "daemon": daemon,
    }


def ratios(res: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    rows: list[Row] = res["rows"]
    get = {
        (
            r.tool.split(" ")[0] + (" cbt" if "CBT" in r.tool else " digest" if "digest" in r.tool else ""),
            r.kind,
        ): r
        for r in rows
    }
    rf, ri = get[("restic", "full")], get[("restic", "incremental")]
    out = []
    for path in ("cbt", "digest"):
        f, i = get[(f"esxi-reconciler {path}", "full")], get[(f"esxi-reconciler {path}", "incremental")]
        out.append((f"{path}: full throughput / restic's", f.mbps / rf.mbps, ">= 2", f.mbps / rf.mbps >= 2))
        want = 8 if path == "cbt" else 3
        out.append(
            (
                f"{path}: restic incremental time / ours (one CLI run)",
                ri.seconds / i.seconds,
                f">= {want}",
                ri.seconds / i.seconds >= want,
            )
        )
        host = LICENSED if path == "cbt" else FREE
        if host in res.get("daemon", {}):
            d = res["daemon"][host]
            out.append((f"{path}: daemon's per-VM incremental (seconds)", d, "report", True))
            out.append((f"{path}: restic incremental time / daemon's per-VM", ri.seconds / d, "report", True))
        net = (i.network or 0) / res["changed"]
        out.append((f"{path}: incremental bytes over network / guest-changed bytes", net, "<= 2", net <= 2))
        g = i.repo_growth / ri.repo_growth
        out.append((f"{path}: incremental repo growth / restic's", g, "<= 1", g <= 1))
        out.append(
            (
                f"{path}: peak RSS (MiB, max of full/incr)",
                max(f.peak_rss, i.peak_rss) / MiB,
                "< 300",
                max(f.peak_rss, i.peak_rss) < 300 * MiB,
            )
        )
    return out


def rss_sweep(args: argparse.Namespace) -> list[tuple[int, Row]]:
    out = []
    for size in [parse_size(x) for x in args.sweep_sizes.split(",")]:
        image, _ = image_for(Path(args.cache), size, args.seed)
        lab, handle = start_lab(image, size)
        root = Path(tempfile.mkdtemp(prefix="bench-rss-", dir=args.work))
        try:
            cfg = write_config(handle, root)
            for host in (LICENSED, FREE):
                try:
                    row = product_backup(cfg, root, host, "full", size)
                except RuntimeError as exc:  # report and go on: the other sizes still tell
                    print(f"{size // GiB} GiB {host}: FAILED: {str(exc).strip().splitlines()[-2:]}")
                    continue
                out.append((size, row))
                rss = row.peak_rss / MiB
                print(
                    f"{size // GiB} GiB {row.tool}: {row.seconds:.1f}s {row.mbps:.0f} MB/s"
                    f" peak RSS {rss:.0f} MiB"
                )
        finally:
            handle.close()
            lab.stop()
            shutil.rmtree(root, ignore_errors=True)
    return out


def report(args: argparse.Namespace, info: dict[str, str], res: dict[str, Any]) -> str:
    """The run as markdown: machine, command, table and the targets."""
    kinds = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in res["kinds"].items())
    vers = versions()
    lines = [
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, Linux {info['kernel']},"
        f" Python {info['python']}. Date: {info['date']}.",
        "",
        f"Command: `.venv/bin/python -m bench.backup {' '.join(sys.argv[1:])}`",
        "",
        f"Disk: {args.size / GiB:g} GiB raw image, seed {args.seed}: {kinds}."
        f" Guest writes: {args.percent:g} %"
        f" → {res['changed']:,} bytes changed in {res['write_runs']} runs (4 KiB–1 MiB, scattered).",
        f"Tools: {vers['restic']} (repository v2, compression auto); {vers['borg']}"
        f" (`--compression {args.borg_compression}`, repokey-blake2);"
        " esxi-reconciler zstd level 1 (its default) + AES-256-GCM, 1 MiB chunks,"
        " production Argon2id key cost.",
        "",
        table(res["rows"]),
        "",
        "| target | measured | want | met |",
        "|---|---|---|---|",
    ]
    for name, value, want, ok in ratios(res):
        lines.append(f"| {name} | {value:.2f} | {want} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=4 * GiB, help="disk size (default 4G)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--percent", type=float, default=1.0, help="guest write percent (default 1)")
    parser.add_argument(
        "--borg-compression", default="lz4", help="borg --compression (default lz4, borg's default)"
    )
    parser.add_argument(
        "--cache", default="/var/tmp/esxi-reconciler-bench", help="where generated images are kept"
    )
    parser.add_argument("--work", default="/var/tmp", help="where repositories and copies go")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--rss-sweep", action="store_true", help="only full backups (sizes: --sweep-sizes): peak RSS"
    )
    parser.add_argument("--sweep-sizes", default="1G,4G,8G", help="disk sizes of --rss-sweep")
    parser.add_argument("--json", help="write raw results here")
    parser.add_argument(
        "--skip-tools", action="store_true", help="only the product (no restic/borg, no ratios)"
    )
    parser.add_argument("--markdown", help="write the report (markdown) here")
    args = parser.parse_args()
    info = machine()
    compile_product()
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if args.rss_sweep:
        sweep = rss_sweep(args)
        lines = ["| disk | path | wall s | MB/s | peak RSS |", "|---|---|---|---|---|"]
        for size, row in sweep:
            rss = row.peak_rss / MiB
            lines.append(
                f"| {size // GiB} GiB | {row.tool} | {row.seconds:.1f} | {row.mbps:,.0f} | {rss:.0f} MiB |"
            )
        text = (
            f"Date: {info['date']}. Command: `.venv/bin/python -m bench.backup --rss-sweep`\n\n"
            + "\n".join(lines)
        )
        print("\n" + text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"machine": info, "sweep": [(s, asdict(r)) for s, r in sweep]})
            )
        return 0
    res = main_run(args)
    if args.skip_tools:
        print("\n" + table(res["rows"]))
        return 0
    text = report(args, info, res)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        rows = [asdict(r) for r in res["rows"]]
        Path(args.json).write_text(json.dumps({"machine": info, **{**res, "rows": rows}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
