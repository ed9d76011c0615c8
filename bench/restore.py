"""Restore benchmark: the newest point of the benchmark disk (after a 1 % incremental, so the point
shares chunks with its parent) restored through the product's CLI as an ``export`` raw image, as an
``export`` VMDK, as a new VM on the free lab host (SSH) and as a new VM on the licensed lab host (SSH
off: everything over the API and HTTPS), next to ``restic restore`` and ``borg extract`` of the same
file. Same conventions as :mod:`bench.backup`: every tool is a child process, one run, ratios within
the run, peak RSS of the child. Run as root (the lab needs it):

    .venv/bin/python -m bench.restore [--size 4G] [--seed 1]

Every restored disk is compared byte for byte with the source (``cmp`` against the free host's
``-flat.vmdk`` copied after the guest writes; both hosts' disks got the same writes), outside the
timed window. The licensed host is configured with ``ssh: {enabled: false}``, so its backups read over
HTTPS (CBT) and its restore uploads over HTTPS. restic restores with its defaults (no ``--sparse``);
borg extracts with its defaults (``--sparse`` off).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.backup import (
    CLI,
    FREE,
    LICENSED,
    PASSPHRASE,
    VM,
    GiB,
    MiB,
    Row,
    borg,
    compile_product,
    copy_flat,
    image_for,
    machine,
    product_backup,
    restic,
    run_child,
    start_lab,
    versions,
    write_config,
)
from esxisim.handle import LabHandle
from esxisim.lab import parse_size


@dataclass
class Restore:
    tool: str
    seconds: float
    logical: int
    peak_rss: int
    cpu: float
    identical: bool
    written: int
    """Bytes the restored file occupies (``st_blocks``): what a thin target allocated."""

    @property
    def mbps(self) -> float:
        return self.logical / self.seconds / 1e6


def same_bytes(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "--silent", str(a), str(b)], check=False).returncode == 0


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def product(cfg: Path, verb: list[str]) -> list[str]:
    return [CLI, "--config", str(cfg), "--log-level", "warning", "--log-format", "json", *verb]


def measure(tool: str, argv: list[str], result: Path, src: Path, size: int, **kw: Any) -> Restore:
    run = run_child(argv, **kw)
    if not result.exists():
        raise RuntimeError(f"{tool}: no {result} after the restore:\n{run.output[-2000:]}")
    row = Restore(tool, run.seconds, size, run.peak_rss, run.cpu, same_bytes(result, src), allocated(result))
    print(
        f"{tool}: {row.seconds:.2f}s {row.mbps:,.0f} MB/s peak RSS {row.peak_rss / MiB:.0f} MiB"
        f" cpu {row.cpu:.1f}s identical={row.identical}",
        flush=True,
    )
    return row


def restores(handle: LabHandle, cfg: Path, root: Path, src: Path, size: int, tools: bool) -> list[Restore]:
    out: list[Restore] = []
    for fmt, name in (("raw", f"{VM[FREE]}.img"), ("vmdk", f"{VM[FREE]}-flat.vmdk")):
        target = root / f"export-{fmt}"
        argv = product(cfg, ["export", VM[FREE], "--to", str(target), "--format", fmt])
        out.append(measure(f"esxi-reconciler export {fmt}", argv, target / name, src, size))
        shutil.rmtree(target)
    for host, how in ((FREE, "SSH"), (LICENSED, "HTTPS")):
        new = f"{VM[host]}-restored"
        argv = product(cfg, ["restore", VM[host], "--name", new])
        flat = handle.local_path(host, f"[datastore1] {new}/{new}-flat.vmdk")
        lic = "free" if host == FREE else "licensed"
        out.append(measure(f"esxi-reconciler restore as new VM ({lic}, {how})", argv, flat, src, size))
        shutil.rmtree(flat.parent)  # the lab's datastore is a local directory; the VM stays registered
    if tools:
        env = {
            "RESTIC_PASSWORD": PASSPHRASE,
            "RESTIC_REPOSITORY": str(root / "restic-repo"),
            "RESTIC_CACHE_DIR": str(root / "restic-cache"),
        }
        target = root / "restic-out"
        argv = ["restic", "restore", "latest", "--target", str(target)]
        out.append(measure("restic restore", argv, target / src.relative_to("/"), src, size, env=env))
        shutil.rmtree(target)
        target = root / "borg-out"
        target.mkdir()
        env = {"BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(root / "borg-base")}
        argv = ["borg", "extract", f"{root / 'borg-repo'}::incremental"]
        out.append(
            measure("borg extract", argv, target / src.relative_to("/"), src, size, env=env, cwd=target)
        )
        shutil.rmtree(target)
    return out


def main_run(args: argparse.Namespace) -> dict[str, Any]:
    size: int = args.size
    image, kinds = image_for(Path(args.cache), size, args.seed)
    lab, handle = start_lab(image, size)
    root = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=args.work))
    backups: list[Row] = []
    try:
        cfg = write_config(handle, root, licensed_ssh=False)
        src = root / "disk-flat.vmdk"
        copy_flat(handle, src)
        for host in (LICENSED, FREE):
            backups.append(product_backup(cfg, root, host, "full", size))
        if not args.skip_tools:
            backups.append(restic(root, src, "full"))
            backups.append(borg(root, src, "full", args.borg_compression))
        for host in (LICENSED, FREE):
            handle.client(host).guest_write(VM[host], args.percent, args.seed + 100)
        copy_flat(handle, src)
        for host in (LICENSED, FREE):
            backups.append(product_backup(cfg, root, host, "incremental", size))
        if not args.skip_tools:
            backups.append(restic(root, src, "incremental"))
            backups.append(borg(root, src, "incremental", args.borg_compression))
        for row in backups:
            print(f"backup {row.tool} {row.kind}: {row.seconds:.2f}s", flush=True)
        rows = restores(handle, cfg, root, src, size, not args.skip_tools)
    finally:
        handle.close()
        lab.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return {"size": size, "kinds": kinds, "rows": rows}


def table(rows: list[Restore]) -> str:
    lines = [
        "| restore | wall s | MB/s (logical) | peak RSS | CPU s | allocated | identical to the source |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tool} | {r.seconds:.2f} | {r.mbps:,.0f} | {r.peak_rss / MiB:.0f} MiB | {r.cpu:.1f}"
            f" | {r.written / 1e6:,.0f} MB | {'yes' if r.identical else 'NO'} |"
        )
    return "\n".join(lines)


def targets(rows: list[Restore]) -> list[tuple[str, float, str, bool]]:
    by = {r.tool: r for r in rows}
    restic_row = by.get("restic restore")
    out = []
    if restic_row is not None:
        raw = by["esxi-reconciler export raw"]
        ratio = raw.mbps / restic_row.mbps
        out.append(("export raw throughput / restic restore's", ratio, ">= 2", ratio >= 2))
        for r in rows:
            if "new VM" in r.tool:
                ratio = r.mbps / restic_row.mbps
                out.append(
                    (f"{r.tool[len('esxi-reconciler ') :]} / restic restore's", ratio, ">= 1", ratio >= 1)
                )
    for r in rows:
        if r.tool.startswith("esxi-reconciler"):
            rss = r.peak_rss / MiB
            out.append((f"peak RSS of {r.tool[len('esxi-reconciler ') :]} (MiB)", rss, "< 300", rss < 300))
    out.append(
        (
            "every restored disk identical to the source",
            float(all(r.identical for r in rows)),
            "1",
            all(r.identical for r in rows),
        )
    )
    return out


def report(args: argparse.Namespace, info: dict[str, str], res: dict[str, Any], load: str) -> str:
    kinds = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in res["kinds"].items())
    vers = versions()
    lines = [
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['ram']} RAM, Linux {info['kernel']},"
        f" Python {info['python']}. Date: {info['date']}. Load average at the start: {load}.",
        "",
        f"Command: `.venv/bin/python -m bench.restore {' '.join(sys.argv[1:])}`",
        "",
        f"Disk: {args.size / GiB:g} GiB raw image, seed {args.seed}: {kinds}; restored: the point after a"
        f" {args.percent:g} % incremental. Tools: {vers['restic']}; {vers['borg']}"
        f" (`--compression {args.borg_compression}`).",
        "",
        table(res["rows"]),
        "",
        "| target | measured | want | met |",
        "|---|---|---|---|",
    ]
    for name, value, want, ok in targets(res["rows"]):
        lines.append(f"| {name} | {value:.2f} | {want} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=4 * GiB, help="disk size (default 4G)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--percent", type=float, default=1.0, help="guest write percent (default 1)")
    parser.add_argument("--borg-compression", default="lz4")
    parser.add_argument("--cache", default="/var/tmp/esxi-reconciler-bench")
    parser.add_argument("--work", default="/var/tmp")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--skip-tools", action="store_true", help="only the product (no restic/borg)")
    parser.add_argument("--json", help="write raw results here")
    parser.add_argument("--markdown", help="write the report (markdown) here")
    args = parser.parse_args()
    info = machine()
    compile_product()
    load = Path("/proc/loadavg").read_text().split()[0]
    print(" ".join(f"{k}={v}" for k, v in info.items()) + f" load={load}", flush=True)
    res = main_run(args)
    text = report(args, info, res, load)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        rows = [asdict(r) for r in res["rows"]]
        Path(args.json).write_text(json.dumps({"machine": info, "load": load, **res, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
