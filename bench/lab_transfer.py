"""Disk read throughput from a simulated host: SSH ``dd`` streams vs HTTPS ``/folder`` Range reads.

The backup engine picks a transport per host; this prints what each one delivers on this machine, as
ratios measured in one run (absolute numbers depend on the machine). Run as root:

    .venv/bin/python -m bench.lab_transfer [--size 1G] [--streams 1,4]
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3

from esxisim.handle import LabHandle, pinned_context
from esxisim.lab import Lab, lab_spec, parse_size

MiB = 1 << 20
BLOCK = 4 * MiB


def read_ssh(handle: LabHandle, host: str, path: str, size: int, streams: int) -> str:
    """Read with ``streams`` parallel ``dd`` channels (one SSH connection each); digest per 4 MiB block."""
    per = -(-size // streams // BLOCK) * BLOCK

    def part(index: int) -> bytes:
        client = handle.connect_ssh(host)
        try:
            transport = client.get_transport()
            assert transport is not None
            channel = transport.open_session()
            start, count = index * per // MiB, per // MiB
            channel.exec_command(f"dd if={shlex.quote(path)} bs=1M skip={start} count={count} 2>/dev/null")
            digests, buf = [], bytearray()
            while chunk := channel.recv(BLOCK):
                buf += chunk
                while len(buf) >= BLOCK:
                    digests.append(hashlib.sha256(buf[:BLOCK]).digest())
                    del buf[:BLOCK]
            if buf:
                digests.append(hashlib.sha256(buf).digest())
            return b"".join(digests)
        finally:
            client.close()

    with ThreadPoolExecutor(streams) as pool:
        parts = list(pool.map(part, range(streams)))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def read_https(handle: LabHandle, host: str, ds: str, rel: str, size: int, streams: int) -> str:
    """Read with ``streams`` parallel pinned HTTPS 4 MiB Range requests; digest per 4 MiB block."""
    api = handle.host(host)["api"]
    ctx = pinned_context(api["host"], api["port"], api["thumbprint_sha256"])
    pool = urllib3.HTTPSConnectionPool(api["host"], api["port"], ssl_context=ctx, maxsize=streams)
    auth = urllib3.util.make_headers(basic_auth=f"root:{handle.password(host)}")
    url = f"/folder/{urllib.parse.quote(rel)}?dcPath=ha-datacenter&dsName={urllib.parse.quote(ds)}"
    per = -(-size // streams // BLOCK) * BLOCK

    def part(index: int) -> bytes:
        digests = []
        for off in range(index * per, min(size, (index + 1) * per), BLOCK):
            headers = {**auth, "Range": f"bytes={off}-{min(size, off + BLOCK) - 1}"}
            res: Any = pool.request("GET", url, headers=headers, preload_content=True)
            if res.status != 206:
                raise RuntimeError(f"Range GET answered {res.status}")
            digests.append(hashlib.sha256(res.data).digest())
        return b"".join(digests)

    with ThreadPoolExecutor(streams) as pool_threads:
        parts = list(pool_threads.map(part, range(streams)))
    return hashlib.sha256(b"".join(parts)).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="disk size (default 1G)")
    parser.add_argument("--streams", default="1,4", help="parallel streams to try (default 1,4)")
    args = parser.parse_args()
    size: int = args.size
    spec = lab_spec(hosts=1, licenses=("licensed",), vms=1, disk_sizes=(size,), fill=1.0)
    lab = Lab(hosts=spec)
    lab.start()
    handle = LabHandle(lab)
    try:
        host = handle.info["hosts"][0]["name"]
        vm = handle.host(host)["vms"][0]
        ds = vm["datastore"]
        rel = f"{vm['name']}/{vm['name']}-flat.vmdk"
        path = f"/vmfs/volumes/{ds}/{rel}"
        print(f"disk {size // MiB} MiB, fully written; host {host}")
        results: dict[str, float] = {}
        digests = set()
        for streams in [int(s) for s in args.streams.split(",")]:
            for name in ("ssh-dd", "https-range"):
                t0 = time.perf_counter()
                if name == "ssh-dd":
                    digests.add(read_ssh(handle, host, path, size, streams))
                else:
                    digests.add(read_https(handle, host, ds, rel, size, streams))
                elapsed = time.perf_counter() - t0
                key = f"{name} x{streams}"
                results[key] = size / elapsed / MiB
                print(f"  {key:16} {results[key]:8.0f} MiB/s  ({elapsed:.2f} s)")
        base = results[next(iter(results))]
        print("ratios to the first row: " + ", ".join(f"{k} {v / base:.2f}" for k, v in results.items()))
        print("all transports read identical bytes" if len(digests) == 1 else "DIGESTS DIFFER")
        return 0 if len(digests) == 1 else 1
    finally:
        handle.close()
        lab.stop()


if __name__ == "__main__":
    raise SystemExit(main())
