"""Object storage benchmark: backup and restore throughput of the repository on moto's S3 server beside a
local directory, and the two Python S3 clients considered for the backend (boto3, obstore) on raw PUT and
GET throughput and memory. No lab: the disk is the seeded image of :mod:`bench.backup`, written into the
repository through the product's own ``Repository``/``ChunkWriter`` (what a backup does after reading a
disk) and read back chunk by chunk into a file (what a restore or export does before writing it out)::

    .venv/bin/python -m bench.s3 [--size 256M] [--objects 128] [--json PATH]

Every case is a child process (``python -m bench.s3 --child ...``): its wall time, CPU and peak RSS
(VmHWM) are its own, as in bench/backup.py. The restored file is compared with the image outside the
timed window. moto's server is one Python process on the same 2 cores, so the S3 figures are a floor
for a real service, and what they compare is the client's overhead; obstore is measured only if it
is installed (``pip install obstore``; it is not a dependency of the product).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.backup import MiB, compile_product, fmt_bytes, image_for, machine, run_child, write_bench_point
from esxisim.lab import parse_size

PASSPHRASE = "bench passphrase, not a secret"
WORKERS = 8
"""Concurrent requests of the raw client cases: the backend's own upload pool size."""


# -- children -----------------------------------------------------------------------------------------


def _target(spec: str) -> Any:
    """``local:/path`` or ``s3:endpoint|bucket|prefix`` as a Backend."""
    from reconciler.repository import LocalBackend
    from reconciler.repository.s3 import S3Backend, S3Location

    kind, _, rest = spec.partition(":")
    if kind == "local":
        return LocalBackend(rest)
    endpoint, bucket, prefix = rest.split("|")
    return S3Backend(
        S3Location(
            bucket=bucket,
            prefix=prefix,
            endpoint=endpoint,
            region="us-east-1",
            path_style=True,
            verify=True,
            access_key_id=os.environ["BENCH_S3_KEY"],
            secret_access_key=os.environ["BENCH_S3_SECRET"],
        )
    )


def child_backup(target: str, image: Path) -> dict[str, Any]:
    from reconciler.repository import KdfParams, Repository

    repo = Repository.init(_target(target), PASSPHRASE, kdf=KdfParams(1024, 1, 1))
    size = image.stat().st_size
    with repo.lock(purpose="bench backup"), open(image, "rb") as f:
        writer = repo.chunk_writer(size)

        def slot(offset: int) -> None:
            writer.write(offset, os.pread(f.fileno(), MiB, offset))

        with ThreadPoolExecutor(2) as pool:  # the backup's two writer threads
            list(pool.map(slot, range(0, size, MiB)))
        index = writer.finish()
        write_bench_point(repo, index, size)
    return {"stored": writer.bytes_stored}


def child_restore(target: str, out: Path) -> dict[str, Any]:
    from reconciler.repository import Repository
    from reconciler.repository.chunks import HOLE

    repo = Repository.open(_target(target), PASSPHRASE)
    with repo.lock(purpose="bench restore"):
        (point,) = repo.list_points()
        index = repo.read_index(point.disks[0].index)
        with open(out, "wb") as f:
            f.truncate(point.disks[0].capacity)

            def slot(item: tuple[int, bytes]) -> None:
                n, cid = item
                if cid != HOLE:
                    os.pwrite(f.fileno(), repo.read_chunk(cid)[: index.chunk_length(n)], n * MiB)

            with ThreadPoolExecutor(WORKERS) as pool:  # chunks fetched in parallel, as restore does
                list(pool.map(slot, enumerate(index)))
    return {}


def child_client(client: str, op: str, endpoint: str, bucket: str, objects: int) -> dict[str, Any]:
    """PUT (or GET) ``objects`` objects of 1 MiB, :data:`WORKERS` at once."""
    body = os.urandom(MiB)
    keys = [f"raw/{i:05d}" for i in range(objects)]
    key_id, secret = os.environ["BENCH_S3_KEY"], os.environ["BENCH_S3_SECRET"]
    if client == "boto3":
        import boto3
        import botocore.config

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=botocore.config.Config(max_pool_connections=WORKERS * 2, s3={"addressing_style": "path"}),
        )

        def one(key: str) -> int:
            if op == "put":
                s3.put_object(Bucket=bucket, Key=key, Body=body)
                return MiB
            return len(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

        with ThreadPoolExecutor(WORKERS) as pool:
            moved = sum(pool.map(one, keys))
    else:
        import asyncio

        import obstore
        from obstore.store import S3Store

        store = S3Store(
            bucket,
            endpoint=endpoint,
            access_key_id=key_id,
            secret_access_key=secret,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

        async def run() -> int:
            gate = asyncio.Semaphore(WORKERS)

            async def one(key: str) -> int:
                async with gate:
                    if op == "put":
                        await obstore.put_async(store, key, body)
                        return MiB
                    result = await obstore.get_async(store, key)
                    return len(await result.bytes_async())

            return sum(await asyncio.gather(*(one(k) for k in keys)))

        moved = asyncio.run(run())
    assert moved == objects * MiB
    return {}


# -- the parent ---------------------------------------------------------------------------------------


def _child(args: list[str], env: dict[str, str]) -> tuple[float, int, float]:
    run = run_child([sys.executable, "-m", "bench.s3", "--child", *args], env=env)
    return run.seconds, run.peak_rss, run.cpu


def main_run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.s3server import moto_server

    size = parse_size(args.size)
    image, kinds = image_for(Path(args.cache), size, args.seed)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    rows: list[dict[str, Any]] = []
    with moto_server() as server, tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        env = {"BENCH_S3_KEY": server.access_key, "BENCH_S3_SECRET": server.secret_key}
        bucket = server.bucket()
        targets = {
            "local directory": f"local:{tmp}/repo",
            "S3 (moto)": f"s3:{server.endpoint}|{bucket}|bench",
        }
        for where, target in targets.items():
            seconds, rss, cpu = _child(["backup", target, str(image)], env)
            rows.append(
                {"case": f"backup to {where}", "bytes": size, "seconds": seconds, "rss": rss, "cpu": cpu}
            )
            out = Path(tmp) / "restored.raw"
            seconds, rss, cpu = _child(["restore", target, str(out)], env)
            same = hashlib.sha256(out.read_bytes()).hexdigest() == digest
            out.unlink()
            rows.append(
                {"case": f"restore from {where}", "bytes": size, "seconds": seconds, "rss": rss, "cpu": cpu,
                 "identical": same}
            )  # fmt: skip
        clients = ["boto3"]
        try:
            import obstore  # noqa: F401

            clients.append("obstore")
        except ImportError:
            print("obstore is not installed: only boto3 is measured", flush=True)
        for client in clients:
            raw = server.bucket()
            for op in ("put", "get"):
                seconds, rss, cpu = _child(
                    ["client", client, op, server.endpoint, raw, str(args.objects)], env
                )
                rows.append(
                    {"case": f"{client} {op.upper()} {args.objects} x 1 MiB", "bytes": args.objects * MiB,
                     "seconds": seconds, "rss": rss, "cpu": cpu}
                )  # fmt: skip
    return {"rows": rows, "kinds": kinds, "size": size}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | wall s | MB/s | peak RSS | CPU s | identical |", "|---|---|---|---|---|---|"]
    for r in rows:
        same = {True: "yes", False: "NO", None: ""}[r.get("identical")]
        lines.append(
            f"| {r['case']} | {r['seconds']:.2f} | {r['bytes'] / r['seconds'] / 1e6:.0f} |"
            f" {fmt_bytes(r['rss'])} | {r['cpu']:.1f} | {same} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="disk image size (default 256M)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--objects", type=int, default=128, help="1 MiB objects per raw client case")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "esxi-bench-images"))
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "backup":
            child_backup(rest[0], Path(rest[1]))
        elif what == "restore":
            child_restore(rest[0], Path(rest[1]))
        else:
            child_client(rest[0], rest[1], rest[2], rest[3], int(rest[4]))
        return 0
    info = machine()
    compile_product()
    load = os.getloadavg()[0]
    res = main_run(args)
    print(f"Machine: {info}. Load average at the start: {load:.2f}.")
    print(f"Disk: {fmt_bytes(res['size'])} image, seed {args.seed}: {res['kinds']}")
    print(table(res["rows"]))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "load": load, **res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
