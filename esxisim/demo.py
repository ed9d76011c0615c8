"""``make demo``: start a two-host lab, back it up with the product's CLI as a user would, stop it.

1. start the lab (``esxi1`` free-licensed, ``esxi2`` licensed; two VMs each, a 128 MiB and a 64 MiB
   disk per VM) and show it;
2. write a configuration for it under ``STATE_DIR/demo/config`` (a git work tree), derived from
   ``config.example``: the hosts with the lab's real TLS thumbprints and SSH host keys, passwords and
   the repository passphrase as ``file:`` secrets (mode 600), the ``nas`` repository in
   ``STATE_DIR/demo/repository``, the policies ``web-daily`` (free host; without its night window, so
   it is due whenever the demo runs) and ``apps-nightly`` (licensed host) with a small post hook;
3. ``validate``, ``repo init``, ``repo key export``;
4. ``plan`` (CBT to switch on esxi2, pending on the free esxi1, backups due), ``apply --yes``, ``points``;
5. guest writes (2 % of every disk), ``backup`` of both policies now (incremental: digest-compare on
   the free host, CBT on the licensed one) and the savings against the first run;
6. ``run --once`` and ``status``, ``verify``, ``restore --test`` (a restore drill), ``export``;
7. check that no snapshot and no temporary VM is left, and stop the lab (always, also on failure).

The demo's config and repository stay in ``STATE_DIR/demo`` (``make clean`` removes them); a new demo
starts from scratch.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from esxisim.lab import Lab, lab_spec

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "config.example"
DISK_SIZES = (128 * MiB, 64 * MiB)
WRITE_PERCENT = 2.0
POLICIES = ("web-daily", "apps-nightly")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(title: str) -> None:
    _say()
    _say(f"== {title}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# -- the config ----------------------------------------------------------------------------------------


def _private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    path.chmod(0o600)
    return path


def _example(rel: str) -> list[dict[str, Any]]:
    with (EXAMPLE / rel).open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _dump(path: Path, docs: Sequence[dict[str, Any]], note: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True, default_flow_style=None)
    path.write_text(f"# {note}\n{body}")


def write_config(info: dict[str, Any], lab: Lab, demo_dir: Path) -> Path:
    """A config for the running lab in ``demo_dir/config``, shaped like ``config.example``."""
    config = demo_dir / "config"
    secrets = demo_dir / "secrets"
    secrets.mkdir(mode=0o700, parents=True)
    hosts = {h["name"]: h for h in info["hosts"]}
    for name in ("esxi1", "esxi2"):
        (doc,) = _example(f"hosts/{name}.yaml")
        lab_host = hosts[name]
        spec = doc["spec"]
        password = _private(secrets / f"{name}-password", lab.host(name).password)
        spec["address"] = lab_host["api"]["host"]
        spec["credentials"] = {"user": lab_host["ssh"]["user"], "password": {"file": str(password)}}
        spec["api"] = {"port": lab_host["api"]["port"], "thumbprint": lab_host["api"]["thumbprint_sha256"]}
        if spec.get("ssh", {}).get("enabled", True):
            spec["ssh"] = {
                "port": lab_host["ssh"]["port"],
                "host_key": lab_host["ssh"]["host_key_fingerprint"],
            }
        assert spec["license"] == lab_host["license"], (name, spec["license"], lab_host["license"])
        _dump(config / f"hosts/{name}.yaml", [doc], f"config.example/hosts/{name}.yaml, pointed at the lab")
    (repo_doc,) = _example("repositories/nas.yaml")
    key = _private(secrets / "repo-nas-key", os.urandom(24).hex())
    repo_doc["spec"]["backend"]["path"] = str(demo_dir / "repository")
    repo_doc["spec"]["encryption"]["key"] = {"file": str(key)}
    _dump(config / "repositories/nas.yaml", [repo_doc], "config.example/repositories/nas.yaml, in the lab")
    web = next(d for d in _example("policies/web.yaml") if d["metadata"]["name"] == "web-daily")
    (apps,) = _example("policies/apps.yaml")
    hook_log = demo_dir / "hooks.log"
    record = (
        'echo "$ESXI_RECONCILER_HOOK $ESXI_RECONCILER_POLICY/$ESXI_RECONCILER_VM: $ESXI_RECONCILER_STATUS'
    )
    record += f' $ESXI_RECONCILER_POINT_ID" >> {shlex.quote(str(hook_log))}'
    web["spec"]["schedule"].pop("window", None)  # the demo runs at any hour: due now, not tonight
    web["spec"]["schedule"].pop("jitter", None)
    for doc in (web, apps):
        doc["spec"].pop("quiesce", None)  # the lab's guests have no VMware Tools to quiesce with
        doc["spec"]["hooks"] = {"post": [{"command": ["sh", "-c", record], "timeout": "10s"}]}
    _dump(
        config / "policies/web.yaml",
        [web],
        "config.example/policies/web.yaml (web-daily) without its night window, with a post hook",
    )
    _dump(config / "policies/apps.yaml", [apps], "config.example/policies/apps.yaml, with a post hook")
    return config


# -- running the product -------------------------------------------------------------------------------


class Cli:
    """``esxi-reconciler`` as a user runs it: a separate process, config from the environment."""

    def __init__(self, config: Path, state: Path) -> None:
        script = Path(sys.executable).with_name("esxi-reconciler")
        self.argv0 = [str(script)] if script.exists() else [sys.executable, "-m", "reconciler.cli"]
        self.env = {**os.environ, "ESXI_RECONCILER_CONFIG": str(config), "STATE_DIRECTORY": str(state)}

    def run(
        self, *args: str, check: bool = True, show: bool = True, ok: Sequence[int] = (0,)
    ) -> subprocess.CompletedProcess[str]:
        """Run ``esxi-reconciler --log-level error ARGS``; print the command and what it printed (logs
        on stderr interleaved)."""
        argv = ["--log-level", "error", *args]
        if show:
            _say("$ esxi-reconciler " + " ".join(shlex.quote(a) for a in argv))
        res = subprocess.run(
            [*self.argv0, *argv],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if show else subprocess.PIPE,
            text=True,
            check=False,
            timeout=300,
        )
        if show and res.stdout.strip():
            _say(res.stdout.rstrip())
        if check and res.returncode not in ok:
            if not show:
                _say(res.stdout + (res.stderr or ""))
            raise RuntimeError(f"esxi-reconciler {' '.join(args)} exited with {res.returncode}")
        return res

    def points(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.run("points", "--json", show=False).stdout)
        return rows


def git(config: Path, *args: str) -> str:
    """Run git in the config directory as a fixed author (the lab machine may have no git identity)."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "demo",
        "GIT_AUTHOR_EMAIL": "demo@example.org",
        "GIT_COMMITTER_NAME": "demo",
        "GIT_COMMITTER_EMAIL": "demo@example.org",
    }
    done = subprocess.run(["git", "-C", str(config), *args], env=env, check=True, capture_output=True)
    return done.stdout.decode().strip()


def _savings(first: list[dict[str, Any]], second: list[dict[str, Any]], written: dict[str, int]) -> None:
    by_vm = {(r["policy"], r["vm"]): r for r in first}
    header = ("VM", "HOST", "RUN 2 MODE", "GUEST WROTE", "READ 1 -> 2", "SENT 1 -> 2", "STORED 1 -> 2")
    table: list[tuple[str, ...]] = [header]
    for r2 in second:
        r1 = by_vm[(r2["policy"], r2["vm"])]
        cells = []
        for key in ("read", "sent", "stored"):
            cells.append(f"{_size(r1[key])} -> {_size(r2[key])}")
        table.append((r2["vm"], r2["host"], r2["mode"], _size(written.get(r2["vm"], 0)), *cells))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        _say("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    _say()
    for mode, label in (("digest", "free host, digest-compare"), ("cbt", "licensed host, CBT")):
        rows = [(by_vm[(r["policy"], r["vm"])], r) for r in second if r["mode"] == mode]
        if not rows:
            continue
        guest = sum(written.get(r2["vm"], 0) for _, r2 in rows)
        _say(f"  {label} (the guests wrote {_size(guest)}):")
        for key, what in (
            ("read", "read on the host"),
            ("sent", "sent over the network"),
            ("stored", "newly stored"),
        ):
            a = sum(r1[key] for r1, _ in rows)
            b = sum(r2[key] for _, r2 in rows)
            pct = f"{100 * b / a:.1f} %" if a else "-"
            _say(f"    {what:22} first run {_size(a):>10}, second run {_size(b):>10} ({pct} of the first)")
    _say(
        "  digest-compare reads every allocated block on the host (that is how it finds the changes\n"
        "  without CBT) and sends only the blocks whose digest changed; CBT reads only what changed."
    )


def _snapshots_left(lab: Lab) -> dict[str, list[str]]:
    left: dict[str, list[str]] = {}
    for name in lab.hosts:
        for vm in lab.client(name).state()["vms"]:
            if vm.get("snapshots"):
                left.setdefault(name, []).append(vm["name"])
    return left


# -- the demo ------------------------------------------------------------------------------------------


def _run(lab: Lab, info: dict[str, Any], demo_dir: Path) -> None:
    for host in info["hosts"]:
        ssh = host["ssh"]
        _say(
            f"{host['name']} ({host['license']}): API {host['api']['url']}  "
            f"SSH {ssh['user']}@{ssh['host']}:{ssh['port']} ({ssh['host_key_fingerprint']})"
        )
        for vm in host["vms"]:
            disks = ", ".join(_size(d["size"]) for d in vm["disks"])
            _say(f"    vm {vm['name']!r}: disks {disks}")

    _step(f"a configuration for the lab, derived from config.example, in git ({demo_dir / 'config'})")
    config = write_config(info, lab, demo_dir)
    for path in sorted(config.rglob("*.yaml")):
        _say(f"  {path.relative_to(config)}")
    _say(f"  secrets (mode 600, referenced as file: secrets): {demo_dir / 'secrets'}")
    git(config, "init", "-q")
    git(config, "add", "-A")
    git(config, "commit", "-q", "-m", "protect the web and app servers")
    state = demo_dir / "state"
    cli = Cli(config, state)
    _say(f"$ export ESXI_RECONCILER_CONFIG={config} STATE_DIRECTORY={state}")
    cli.run("validate")

    _step("the repository")
    cli.run("repo", "init", "nas")
    cli.run("repo", "key", "export", "nas", "--out", str(demo_dir / "nas-key.json"))

    _step("plan: what the reconciler would do, and why (a dry run: nothing changes)")
    cli.run("plan", "--detailed-exitcode", ok=(2,))
    _say(
        "  esxi2 is licensed: CBT is switched through the API (with a stun cycle, the VMs run).\n"
        "  esxi1 is free: its .vmx can only be edited while a VM is off, so CBT waits for the next\n"
        "  power-off (or the policy's Sunday power-cycle window); its incrementals compare block\n"
        "  digests computed on the host meanwhile."
    )

    _step("apply: make it so (CBT on esxi2, the due backups: full, nothing to compare with yet)")
    cli.run("apply", "--yes")
    cli.run("points")
    first = cli.points()

    _step(f"the guests write ({WRITE_PERCENT:g} % of every disk, scattered)")
    written: dict[str, int] = {}
    for host in info["hosts"]:
        for n, vm in enumerate(host["vms"]):
            answer = lab.client(host["name"]).guest_write(vm["name"], percent=WRITE_PERCENT, seed=100 + n)
            written[vm["name"]] = int(answer["bytes"])
            _say(f"  {host['name']}: {vm['name']!r} wrote {_size(answer['bytes'])}")

    _step("second backup, now rather than at the next schedule: incremental")
    for policy in POLICIES:
        cli.run("backup", policy)
    ids = {r["id"] for r in first}
    second = [r for r in cli.points() if r["id"] not in ids]

    _step("savings of the second run against the first")
    _savings(first, second, written)

    _step("one daemon cycle (run --once), then status: everything is backed up, nothing is due")
    cli.run("run", "--once")
    cli.run("status", ok=(0, 1))

    _step("verify: every restore point can be read back (all data decrypted and checked)")
    cli.run("verify")

    _step("restore drill: web01's newest point as a temporary VM on esxi1, booted, checked, removed")
    cli.run("restore", "web01", "--test", "--host", "esxi1")
    _step("export: db 01's newest point as local files (VMDK), importable without ESXi")
    cli.run("export", "db 01", "--to", str(demo_dir / "export"), "--format", "vmdk")

    _step("hooks: what the post hooks recorded (one line per VM and run)")
    _say((demo_dir / "hooks.log").read_text().rstrip())

    _step("no snapshot and no temporary VM is left on the hosts")
    left = _snapshots_left(lab)
    if left:
        raise RuntimeError(f"snapshots left behind: {left}")
    extra = [v["name"] for h in lab.hosts for v in lab.client(h).state()["vms"] if "restore" in v["name"]]
    if extra:
        raise RuntimeError(f"restored VMs left behind: {extra}")
    _say("  esxi1, esxi2: no VM has a snapshot; only the original VMs are registered")


def run_demo(state_dir: Path) -> int:
    """Start the lab in ``state_dir``, back it up with the CLI, and always stop it."""
    started = time.monotonic()
    spec = lab_spec(hosts=2, licenses=("free", "licensed"), vms=2, disk_sizes=DISK_SIZES)
    lab = Lab(state_dir, hosts=spec)
    demo_dir = lab.state_dir / "demo"
    if demo_dir.exists():  # ours, from a previous demo: start from scratch
        shutil.rmtree(demo_dir)
    demo_dir.mkdir(parents=True)
    _step("starting the simulated lab (vcsim-based API over TLS + OpenSSH per host)")
    status = 1
    try:
        info: dict[str, Any] = lab.start()
        _run(lab, info, demo_dir)
        status = 0
    except Exception as exc:  # noqa: BLE001  whatever failed, the demo says so and still stops the lab
        _say(f"\nDEMO FAILED: {exc}")
    finally:
        _step("stopping the lab")
        lab.stop()
        leftovers = lab.leftovers()
        _say(f"lab stopped; left behind: {leftovers}" if leftovers else "lab stopped; nothing left behind")
    _say(f"(config and repository kept in {demo_dir}; demo took {time.monotonic() - started:.0f}s)")
    return status
