"""``python -m esxisim``: start, inspect, drive and stop a lab of simulated ESXi hosts.

python -m esxisim up --state-dir DIR [--hosts 2] [--license free,licensed] [--vms 3]
                     [--disk-sizes 64M,16M] [--seed 1] [--capacity 200G] [--image PATH]
                     [--vm-name HOST:NAME ...] [--fill 0.25]
python -m esxisim status --state-dir DIR [--json]
python -m esxisim guest-write --state-dir DIR [--host H] --vm NAME --percent P --seed S
python -m esxisim fault --state-dir DIR --host H KIND [--delay-ms N] [--off] [--vm NAME] [--command C]
python -m esxisim vim-cmd --state-dir DIR --host H -- ARGS...
python -m esxisim down --state-dir DIR [--keep]
python -m esxisim build [--force]
python -m esxisim demo --state-dir DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from esxisim.build import BuildError, ensure_built
from esxisim.client import ControlError
from esxisim.lab import DEFAULT_ESXI_VERSION, ESXI_VERSIONS, LICENSES, Lab, LabError, lab_spec, parse_size
from esxisim.sshd import SshError

FAULT_KINDS = (
    "api-slow",
    "api-down",
    "api-up",
    "snapshot-fail",
    "power-on-fail",
    "vimcmd-exit-zero",
    "vimcmd-garbage",
    "cbt-reset",
    "ssh-drop",
    "host-down",
    "host-up",
    "clear",
)

Handler = Callable[[argparse.Namespace], int]


def _sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def _licenses(text: str) -> list[str]:
    out = [part.strip() for part in text.split(",") if part.strip()]
    bad = [lic for lic in out if lic not in LICENSES]
    if bad or not out:
        raise argparse.ArgumentTypeError(
            f"licences are {', '.join(LICENSES)} (comma-separated), got {text!r}"
        )
    return out


def _vm_names(items: Sequence[str] | None) -> dict[str, Sequence[str]] | None:
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        host, sep, name = item.partition(":")
        if not sep or not host or not name:
            raise LabError(f"--vm-name wants HOST:NAME, got {item!r}")
        out.setdefault(host, []).append(name)
    return dict(out)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def summary(info: dict[str, Any]) -> str:
    """A readable description of a running lab (from lab.json)."""
    lines = [f"esxisim lab in {info['state_dir']}  (lab.json: {Path(info['state_dir']) / 'lab.json'})"]
    for h in info.get("hosts", []):
        api, ssh = h["api"], h["ssh"]
        version = h.get("esxi_version", DEFAULT_ESXI_VERSION)
        lines.append(f"  {h['name']}  licence {h['license']}  ESXi {version}")
        lines.append(f"    API  {api['url']}  user root  SHA-256 {api['thumbprint_sha256']}")
        lines.append(
            f"    SSH  ssh -p {ssh['port']} -i {ssh['private_key']} "
            f"-o UserKnownHostsFile={ssh['known_hosts']} "
            f"root@{ssh['host']}   (password in {ssh['password_file']})"
        )
        lines.append(f"         host key {ssh['host_key_type']} {ssh['host_key_fingerprint']}")
        for vm in h.get("vms", []):
            disks = ", ".join(f"{d['file']} ({int(d['size']) // (1 << 20)} MiB)" for d in vm.get("disks", []))
            lines.append(f"    VM {vm['vmid']:>3}  {vm['name']}  {vm['vmx']}  disks: {disks}")
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    spec = lab_spec(
        hosts=args.hosts,
        licenses=args.license,
        vms=args.vms,
        disk_sizes=args.disk_sizes,
        seed=args.seed,
        capacity=args.capacity,
        image=args.image,
        vm_names=_vm_names(args.vm_name),
        fill=args.fill,
        esxi_version=args.esxi_version,
    )
    lab = Lab(args.state_dir, spec, ready_timeout=args.timeout)
    info = lab.start()
    print(summary(info))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = Lab.attach(args.state_dir)
    if not lab.hosts and not lab.lab_json.exists():
        print(f"esxisim: no lab in {lab.state_dir}", file=sys.stderr)
        return 0
    lab.stop(remove_files=not args.keep)
    print(f"esxisim: lab in {lab.state_dir} stopped" + (" (files kept)" if args.keep else " and removed"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = Lab.attach(args.state_dir)
    if not lab.hosts:
        print(f"esxisim: no lab in {lab.state_dir}", file=sys.stderr)
        return 1
    report: dict[str, Any] = {"state_dir": str(lab.state_dir), "hosts": {}}
    healthy = True
    for name, host in lab.hosts.items():
        entry: dict[str, Any] = {"api_process": host.api_alive(), "sshd": host.sshd.listener_alive()}
        if host.api_alive():
            try:
                entry["state"] = host.client(timeout=30).state()
            except ControlError as exc:
                entry["error"] = str(exc)
        healthy = healthy and entry["api_process"] and entry["sshd"] and "error" not in entry
        report["hosts"][name] = entry
    if args.json:
        _print_json(report)
        return 0 if healthy else 1
    if lab.info:
        print(summary(lab.info))
    for name, entry in report["hosts"].items():
        print(
            f"  {name}: esxisim-host {'running' if entry['api_process'] else 'DOWN'}, "
            f"sshd {'running' if entry['sshd'] else 'DOWN'}"
            + (f", error: {entry['error']}" if "error" in entry else "")
        )
        for vm in (entry.get("state") or {}).get("vms", []):
            snaps = vm.get("snapshots") or []
            print(f"    {vm.get('vmid'):>3} {vm.get('name')}: {vm.get('power')}, {len(snaps)} snapshot(s)")
    return 0 if healthy else 1


def _host_of_vm(lab: Lab, vm: str) -> str:
    found = [h["name"] for h in lab.info.get("hosts", []) if any(v["name"] == vm for v in h.get("vms", []))]
    if len(found) != 1:
        raise LabError(f"VM {vm!r} is on {len(found)} hosts ({', '.join(found) or 'none'}): pass --host")
    return str(found[0])


def cmd_guest_write(args: argparse.Namespace) -> int:
    lab = Lab.attach(args.state_dir)
    host = args.host or _host_of_vm(lab, args.vm)
    _print_json(lab.client(host).guest_write(args.vm, args.percent, args.seed))
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    lab = Lab.attach(args.state_dir)
    options: dict[str, Any] = {}
    if args.kind == "api-slow":
        options["delay_ms"] = args.delay_ms
    elif args.kind in ("snapshot-fail", "power-on-fail", "vimcmd-exit-zero"):
        options["enabled"] = not args.off
    elif args.kind == "vimcmd-garbage":
        options["enabled"] = not args.off
        options["command"] = args.command or ""
    elif args.kind == "cbt-reset":
        if not args.vm:
            raise LabError("cbt-reset needs --vm NAME")
        options["vm"] = args.vm
    _print_json(lab.fault(args.host, args.kind, **options))
    return 0


def cmd_vimcmd(args: argparse.Namespace) -> int:
    lab = Lab.attach(args.state_dir)
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    res = lab.client(args.host).vimcmd(argv)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    return res.exit


def cmd_demo(args: argparse.Namespace) -> int:
    from esxisim.demo import run_demo  # imports pyvmomi: only the demo needs it

    return run_demo(args.state_dir)


def cmd_build(args: argparse.Namespace) -> int:
    print(ensure_built(force=args.force, quiet=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m esxisim", description="Simulated ESXi hosts for the lab."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str, state_dir: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if state_dir:
            p.add_argument("--state-dir", required=True, type=Path, help="the lab's state directory")
        p.set_defaults(handler=handler)
        return p

    p = add("up", cmd_up, "start a lab in the background and print how to reach it")
    p.add_argument("--hosts", type=int, default=2, help="number of hosts (esxi1, esxi2, ...; default 2)")
    p.add_argument(
        "--license", type=_licenses, default=list(LICENSES), help="licences per host, cycled (free,licensed)"
    )
    p.add_argument("--vms", type=int, default=3, help="VMs per host (default 3)")
    p.add_argument(
        "--disk-sizes", type=_sizes, default=[64 << 20, 16 << 20], help="disks of each VM (64M,16M)"
    )
    p.add_argument("--seed", type=int, default=1, help="content seed (default 1)")
    p.add_argument("--capacity", type=parse_size, default=200 << 30, help="datastore capacity (default 200G)")
    p.add_argument("--image", type=Path, help="raw image file used as the first disk of the first VM")
    p.add_argument("--vm-name", action="append", metavar="HOST:NAME", help="VM names of HOST (repeatable)")
    p.add_argument("--fill", type=float, default=0.25, help="fraction of each disk written at creation")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the hosts to be ready")
    p.add_argument(
        "--esxi-version",
        choices=ESXI_VERSIONS,
        default=DEFAULT_ESXI_VERSION,
        help=f"the ESXi version every host answers as (default {DEFAULT_ESXI_VERSION}; see docs/lab.md)",
    )

    p = add("down", cmd_down, "stop the lab and remove its files")
    p.add_argument("--keep", action="store_true", help="keep the files (logs) after stopping")

    p = add("status", cmd_status, "show whether the lab's processes run and what its VMs look like")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("guest-write", cmd_guest_write, "write into a powered-on VM's disks as its guest would")
    p.add_argument("--host", help="host of the VM (found from lab.json if omitted)")
    p.add_argument("--vm", required=True, help="VM name")
    p.add_argument("--percent", type=float, required=True, help="percent of each disk to write")
    p.add_argument("--seed", type=int, required=True, help="seed of the written data and places")

    p = add("fault", cmd_fault, "inject or clear a fault on one host")
    p.add_argument("--host", required=True, help="host name (esxi1, ...)")
    p.add_argument("kind", choices=FAULT_KINDS, help="the fault")
    p.add_argument("--delay-ms", type=int, default=500, help="api-slow: delay of each API call")
    p.add_argument(
        "--off",
        action="store_true",
        help="snapshot-fail, power-on-fail, vimcmd-exit-zero, vimcmd-garbage: switch it off",
    )
    p.add_argument(
        "--command", help="vimcmd-garbage: only this vim-cmd command (e.g. vmsvc/snapshot.get); default: all"
    )
    p.add_argument("--vm", help="cbt-reset: the VM")

    p = add("vim-cmd", cmd_vimcmd, "run vim-cmd on a host through its control API")
    p.add_argument("--host", required=True, help="host name")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="vim-cmd arguments (after --)")

    add("demo", cmd_demo, "start a lab, back it up with esxi-reconciler twice (full, incremental), stop it")

    p = add("build", cmd_build, "build the Go host binary if its sources changed", state_dir=False)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (LabError, ControlError, SshError, BuildError, ValueError, OSError) as exc:
        print(f"esxisim: {exc}", file=sys.stderr)
        return 1
