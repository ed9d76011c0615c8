"""Start and stop a lab of simulated ESXi hosts (docs/lab.md): the Go API process and sshd per host.

    with Lab(hosts=lab_spec(hosts=2)) as lab:
        info = lab.info            # the content of lab.json
        lab.client("esxi1").guest_write("web01", 5, seed=7)

``Lab.start`` allocates ports, writes each host's ``sim.json``, starts every ``esxisim-host`` (own
session, logs in the host directory), waits for their ``ready.json``, sets up and starts each host's
sshd in its private mount namespace, and writes ``lab.json``. If anything fails half-way, everything
already started is stopped. ``Lab.stop`` asks each Go process to shut down (then SIGTERM/SIGKILL),
kills every process of each sshd namespace, checks that no process and no mount of the lab is left,
and removes the lab's files. All bookkeeping is in files (pid files, ``sshd.ns``, ``lab.json``), so a
later ``Lab.attach(state_dir)`` (the CLI's ``down``, ``fault`` ...) controls a lab started elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from esxisim import PACKAGE_DIR, GiB, MiB, procs
from esxisim.build import ensure_built
from esxisim.client import ControlClient, ControlError
from esxisim.sshd import HOST_KEY_TYPE, Sshd, SshError, SshPaths, fingerprint, free_port, public_key, set_port
from esxisim.sshd import prepare as prepare_ssh

FIRST_HOST_VM_NAMES = ("web01", "db 01", 'ファイル鯖 "q" $(x)')
"""Default VM names on the first host: plain, with a space, and Japanese with quotes and ``$()``."""

DEFAULT_DISK_SIZES = (64 * MiB, 16 * MiB)
DEFAULT_CAPACITY = 200 * GiB
LICENSES = ("free", "licensed")
ESXI_VERSIONS = ("6.7", "7.0", "8.0")
"""What a host can be started as; the outputs that differ between them are listed in docs/lab.md."""
DEFAULT_ESXI_VERSION = "7.0"


class LabError(RuntimeError):
    """The lab could not be started, controlled or completely stopped."""


# ------------------------------------------------------------------------------------------------
# what to simulate


@dataclass(frozen=True)
class DiskSpec:
    """One virtual disk: ``fill`` of it written with data seeded by ``seed`` (or a raw ``image``)."""

    size: int
    fill: float = 0.25
    seed: int = 1
    image: str | None = None
    thin: bool = True


@dataclass(frozen=True)
class VMSpec:
    """One VM of a host (sim.json ``vms[]``)."""

    name: str
    disks: tuple[DiskSpec, ...]
    datastore: str = "datastore1"
    guest_id: str = "otherLinux64Guest"
    power: str = "poweredOn"
    cbt: bool = False
    hw_version: int = 14
    memory_mb: int = 1024
    cpus: int = 1


@dataclass(frozen=True)
class DatastoreSpec:
    name: str = "datastore1"
    capacity: int = DEFAULT_CAPACITY


@dataclass(frozen=True)
class HostSpec:
    """One simulated host."""

    name: str
    license: str = "free"
    vms: tuple[VMSpec, ...] = ()
    esxi_version: str = DEFAULT_ESXI_VERSION
    datastores: tuple[DatastoreSpec, ...] = field(default_factory=lambda: (DatastoreSpec(),))


def parse_size(text: str) -> int:
    """``64M`` → 67108864 (binary units K, M, G, T; a plain number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 64M, 1G, 200G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def default_vm_names(host_index: int, count: int) -> list[str]:
    """VM names of host ``host_index`` (0-based): the tricky names first on the first host."""
    if host_index == 0:
        base = list(FIRST_HOST_VM_NAMES)
        extra = [f"vm{i + 1:02d}" for i in range(len(base), count)]
        return (base + extra)[:count]
    return [f"app{host_index + 1}{i + 1:02d}" for i in range(count)]


def lab_spec(  # noqa: PLR0913  the lab's knobs, each with a default; tests name the one or two they change
    hosts: int = 2,
    licenses: Sequence[str] = LICENSES,
    vms: int = 3,
    disk_sizes: Sequence[int] = DEFAULT_DISK_SIZES,
    seed: int = 1,
    capacity: int = DEFAULT_CAPACITY,
    image: str | Path | None = None,
    vm_names: dict[str, Sequence[str]] | None = None,
    fill: float = 0.25,
    power: str = "poweredOn",
    esxi_version: str = DEFAULT_ESXI_VERSION,
) -> tuple[HostSpec, ...]:
    """Describe a lab: ``hosts`` hosts named esxi1.., licences cycling through ``licenses``, ``vms``
    VMs per host (unless ``vm_names`` gives a host's names), each with one disk per ``disk_sizes``
    entry. ``image`` becomes the first disk of the first VM of the first host. Every host answers as
    ESXi ``esxi_version`` (one of :data:`ESXI_VERSIONS`).
    """
    if hosts < 1:
        raise ValueError("a lab needs at least one host")
    if esxi_version not in ESXI_VERSIONS:
        raise ValueError(f"esxi_version must be one of {', '.join(ESXI_VERSIONS)}, got {esxi_version!r}")
    if not licenses or any(lic not in LICENSES for lic in licenses):
        raise ValueError(f"licenses must be taken from {LICENSES}, got {list(licenses)}")
    if not disk_sizes:
        raise ValueError("each VM needs at least one disk")
    out = []
    for h in range(hosts):
        name = f"esxi{h + 1}"
        names = list((vm_names or {}).get(name) or default_vm_names(h, vms))
        vm_specs = []
        for v, vm_name in enumerate(names):
            disks = []
            for d, size in enumerate(disk_sizes):
                disk_seed = seed * 1_000_000 + h * 10_000 + v * 100 + d + 1
                disk_image = None
                disk_size = size
                if image is not None and h == 0 and v == 0 and d == 0:
                    disk_image = str(Path(image).resolve())
                    disk_size = -(-Path(disk_image).stat().st_size // MiB) * MiB
                disks.append(DiskSpec(size=disk_size, fill=fill, seed=disk_seed, image=disk_image))
            vm_specs.append(VMSpec(name=vm_name, disks=tuple(disks), power=power))
        out.append(
            HostSpec(
                name=name,
                license=licenses[h % len(licenses)],
                vms=tuple(vm_specs),
                esxi_version=esxi_version,
                datastores=(DatastoreSpec("datastore1", capacity),),
            )
        )
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# one host


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


class SimHost:
    """The files and processes of one simulated host under ``STATE/hosts/<name>``."""

    def __init__(self, host_dir: Path) -> None:
        self.dir = host_dir
        self.name = host_dir.name
        self.sim_json = host_dir / "sim.json"
        self.ready_json = host_dir / "ready.json"
        self.control_socket = host_dir / "run" / "control.sock"
        self.go_log = host_dir / "esxisim-host.log"
        self.go_pid_file = host_dir / "esxisim-host.pid"
        self.sshd = Sshd(host_dir)
        self.ssh = SshPaths(host_dir / "ssh")
        self._go: subprocess.Popen[bytes] | None = None
        self.die_with_parent = False

    # -- setup

    def prepare(self, spec: HostSpec, ssh_port: int) -> None:
        """Create the host's directories, SSH material and sim.json."""
        for sub in ("run", "tls", "root", "tmp", "datastores"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(15)
        prepare_ssh(self.ssh, ssh_port, password)
        datastores = []
        for ds in spec.datastores:
            path = self.dir / "datastores" / ds.name
            path.mkdir(parents=True, exist_ok=True)
            datastores.append({"name": ds.name, "path": str(path), "capacity": ds.capacity})
        sim = {
            "name": spec.name,
            "license": spec.license,
            "esxi_version": spec.esxi_version,
            "listen": "127.0.0.1:0",
            "user": "root",
            "password": password,
            "state_dir": str(self.dir),
            "helpers": str(PACKAGE_DIR),
            "datastores": datastores,
            "vms": [
                {
                    "name": vm.name,
                    "datastore": vm.datastore,
                    "guest_id": vm.guest_id,
                    "power": vm.power,
                    "cbt": vm.cbt,
                    "hw_version": vm.hw_version,
                    "memory_mb": vm.memory_mb,
                    "cpus": vm.cpus,
                    "disks": [
                        {"size": d.size, "fill": d.fill, "seed": d.seed, "image": d.image, "thin": d.thin}
                        for d in vm.disks
                    ],
                }
                for vm in spec.vms
            ],
        }
        _write_json(self.sim_json, sim)

    def write_volumes(self, state: dict[str, Any]) -> None:
        """Record the datastores' names, directories and UUIDs for the host's /vmfs/volumes."""
        volumes = [{"name": d["name"], "path": d["path"], "uuid": d.get("uuid")} for d in state["datastores"]]
        _write_json(self.dir / "volumes.json", volumes)

    def sim(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.sim_json.read_text())
        return data

    @property
    def password(self) -> str:
        return self.ssh.password.read_text().strip()

    def ssh_port(self) -> int:
        m = re.search(r"^Port (\d+)$", self.ssh.config.read_text(), re.MULTILINE)
        if not m:
            raise LabError(f"no Port in {self.ssh.config}")
        return int(m.group(1))

    def start_sshd(self, taken: set[int]) -> None:
        """Start sshd; if its port was taken meanwhile (by an ephemeral port), move to another one."""
        for attempt in range(3):
            try:
                self.sshd.start(self.ssh_port())
                return
            except SshError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                self.sshd.stop()
                port = free_port()
                while port in taken:
                    port = free_port()
                taken.add(port)
                set_port(self.ssh, port)

    # -- the Go process

    def start_api(self, binary: Path) -> None:
        self.ready_json.unlink(missing_ok=True)
        env = dict(os.environ, TMPDIR=str(self.dir / "tmp"))
        with self.go_log.open("ab") as log:
            self._go = subprocess.Popen(
                [str(binary), "--config", str(self.sim_json)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.dir,
                env=env,
                start_new_session=True,
                preexec_fn=procs.die_with_parent if self.die_with_parent else None,
            )
        self.go_pid_file.write_text(f"{self._go.pid}\n")

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        """Wait for ready.json (and the control socket) of this host's Go process."""
        pid = self._go_pid()
        while True:
            if pid is None or not procs.alive(pid):
                if pid is not None:
                    procs.reap(pid)
                raise LabError(
                    f"{self.name}: esxisim-host exited before it was ready; "
                    f"{self.go_log}:\n{_tail(self.go_log)}"
                )
            if self.ready_json.exists():
                try:
                    ready: dict[str, Any] = json.loads(self.ready_json.read_text())
                except ValueError:
                    ready = {}
                if (
                    ready.get("api_port")
                    and Path(ready.get("control_socket") or self.control_socket).exists()
                ):
                    return ready
            if time.monotonic() > deadline:
                raise LabError(
                    f"{self.name}: no ready.json within the timeout; {self.go_log}:\n{_tail(self.go_log)}"
                )
            time.sleep(0.05)

    def _go_pid(self) -> int | None:
        if self._go is not None:
            return self._go.pid
        try:
            pid = int(self.go_pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        # only our own process: the binary name and this host's sim.json on its command line
        cmd = procs.cmdline(pid)
        if cmd and cmd[0].endswith("esxisim-host") and str(self.sim_json) in cmd:
            return pid
        return None

    def api_alive(self) -> bool:
        pid = self._go_pid()
        return pid is not None and procs.alive(pid)

    def stop_api(self) -> None:
        """POST /shutdown, then SIGTERM and SIGKILL the process group if it does not go."""
        pid = self._go_pid()
        if pid is not None and procs.alive(pid):
            if self.control_socket.exists():
                with contextlib.suppress(ControlError):
                    ControlClient(self.control_socket, timeout=5).shutdown()
            left = procs.wait_gone([pid], 5.0)
            if left:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                left = procs.wait_gone([pid], 5.0)
            if left:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                left = procs.wait_gone([pid], 5.0)
            if left:
                raise LabError(f"{self.name}: esxisim-host (pid {pid}) survived SIGKILL")
            # helpers it may have left in its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self._go is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._go.wait(timeout=5)
            self._go = None
        self.go_pid_file.unlink(missing_ok=True)

    def client(self, timeout: float = 600.0) -> ControlClient:
        return ControlClient(self.control_socket, timeout=timeout)

    # -- lab.json entry

    def info(self, ready: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        sim = self.sim()
        port = self.ssh_port()
        kind, blob = public_key(self.ssh.ecdsa_key)
        if kind != HOST_KEY_TYPE:
            raise LabError(f"{self.ssh.ecdsa_key} is a {kind} key")
        api_port = int(ready["api_port"])
        return {
            "name": sim["name"],
            "license": sim["license"],
            "esxi_version": sim.get("esxi_version", DEFAULT_ESXI_VERSION),
            "api": {
                "url": ready.get("api_url") or f"https://127.0.0.1:{api_port}/sdk",
                "host": "127.0.0.1",
                "port": api_port,
                "user": sim["user"],
                "thumbprint_sha1": ready["thumbprint_sha1"],
                "thumbprint_sha256": ready["thumbprint_sha256"],
                "cert": ready["cert"],
            },
            "ssh": {
                "host": "127.0.0.1",
                "port": port,
                "user": "root",
                "host_key_fingerprint": fingerprint(blob),
                "host_key_type": kind,
                "known_hosts": str(self.ssh.known_hosts),
                "password_file": str(self.ssh.password),
                "private_key": str(self.ssh.client_key),
            },
            "control_socket": str(ready.get("control_socket") or self.control_socket),
            "datastores": sim["datastores"],
            "vms": vm_entries(state),
        }


def vm_entries(state: dict[str, Any]) -> list[dict[str, Any]]:
    """lab.json ``vms`` from the control API's ``GET /state``."""
    out = []
    for vm in state.get("vms", []):
        disks = []
        for d in vm.get("disks", []):
            chain = d.get("chain") or []
            base = chain[0]["descriptor"] if chain else d["file"]
            disks.append({"key": d["key"], "file": base, "size": d["capacity"]})
        out.append(
            {
                "name": vm.get("name"),
                "vmid": str(vm.get("vmid")),
                "datastore": vm.get("datastore"),
                "vmx": vm.get("vmx"),
                "disks": disks,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# the lab


class Lab:
    """A lab of simulated hosts in ``state_dir`` (a fresh temporary directory if not given).

    ``die_with_parent``: the hosts' processes get SIGTERM when the starting process dies (for test
    sessions; the CLI's ``up`` leaves it off so that the lab outlives the command).
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        hosts: Sequence[HostSpec] | None = None,
        *,
        ready_timeout: float = 90.0,
        die_with_parent: bool = False,
    ) -> None:
        self._own_dir = state_dir is None
        self.state_dir = Path(
            tempfile.mkdtemp(prefix="esxisim-") if state_dir is None else state_dir
        ).resolve()
        self.specs = tuple(hosts) if hosts is not None else lab_spec()
        self.ready_timeout = ready_timeout
        self.die_with_parent = die_with_parent
        self.lab_json = self.state_dir / "lab.json"
        self.hosts: dict[str, SimHost] = {}
        self.info: dict[str, Any] = {}

    # -- attach to a lab started by another process

    @classmethod
    def attach(cls, state_dir: str | Path) -> Lab:
        """A Lab for the files in ``state_dir`` (lab.json and/or hosts/*), to stop or control it."""
        lab = cls(state_dir, hosts=())
        lab._own_dir = False
        if lab.lab_json.exists():
            lab.info = json.loads(lab.lab_json.read_text())
        hosts_dir = lab.state_dir / "hosts"
        if hosts_dir.is_dir():
            for d in sorted(hosts_dir.iterdir()):
                if d.is_dir():
                    lab.hosts[d.name] = SimHost(d)
        return lab

    def host(self, name: str) -> SimHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in {self.state_dir} (hosts: {', '.join(self.hosts)})") from None

    def host_info(self, name: str) -> dict[str, Any]:
        for h in self.info.get("hosts", []):
            if h["name"] == name:
                return dict(h)
        raise LabError(f"no host {name!r} in {self.lab_json}")

    def client(self, name: str, timeout: float = 600.0) -> ControlClient:
        return self.host(name).client(timeout)

    def running(self) -> bool:
        """True if any process of this lab is alive."""
        return any(h.api_alive() or h.sshd.listener_alive() for h in self.hosts.values())

    # -- start / stop

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> dict[str, Any]:
        """Start every host and write lab.json; on any failure stop what was started and re-raise."""
        if not self.specs:
            raise LabError("no hosts to start")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        previous = Lab.attach(self.state_dir)
        if previous.running():
            raise LabError(
                f"a lab is already running in {self.state_dir}: stop it first (python -m esxisim down)"
            )
        previous.stop(remove_files=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            binary = ensure_built()
            ports: set[int] = set()
            for spec in self.specs:
                host = SimHost(self.state_dir / "hosts" / spec.name)
                host.die_with_parent = host.sshd.die_with_parent = self.die_with_parent
                self.hosts[spec.name] = host
                port = free_port()
                while port in ports:
                    port = free_port()
                ports.add(port)
                host.prepare(spec, port)
            for host in self.hosts.values():
                host.start_api(binary)
            deadline = time.monotonic() + self.ready_timeout
            ready = {name: host.wait_ready(deadline) for name, host in self.hosts.items()}
            states = {name: host.client().state() for name, host in self.hosts.items()}
            for name, host in self.hosts.items():
                host.write_volumes(states[name])
                host.start_sshd(ports)
            entries = [host.info(ready[name], states[name]) for name, host in self.hosts.items()]
            self.info = {"state_dir": str(self.state_dir), "hosts": entries}
            _write_json(self.lab_json, self.info)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop(remove_files=self._own_dir)
            raise
        return self.info

    def stop(self, remove_files: bool | None = None) -> None:
        """Stop every process of the lab, check nothing is left, and remove its files.

        ``remove_files`` defaults to True: lab.json and hosts/ go (and the state dir if it is then
        empty); pass False to keep them (logs) for a post-mortem.
        """
        errors: list[str] = []
        for host in self.hosts.values():
            try:
                host.sshd.stop()
            except Exception as exc:  # noqa: BLE001  keep stopping the rest, report at the end
                errors.append(f"{host.name} sshd: {exc}")
        for host in self.hosts.values():
            try:
                host.stop_api()
            except Exception as exc:  # noqa: BLE001  keep stopping the rest, report at the end
                errors.append(f"{host.name} esxisim-host: {exc}")
        errors.extend(self.leftovers())
        if errors:
            raise LabError("the lab did not stop cleanly:\n  " + "\n  ".join(errors))
        if remove_files is None or remove_files:
            self.remove_files()

    def leftovers(self) -> list[str]:
        """Processes or mounts of this lab that are still there (empty when it is fully stopped)."""
        found = []
        text = str(self.state_dir)
        pids = procs.lab_pids(text)
        if pids:
            # one more round: a lab process still running with our paths on its command line goes
            procs.end_processes(pids, term_timeout=1.0)
            pids = procs.lab_pids(text)
        for pid in pids:
            found.append(f"process {pid} still running: {' '.join(procs.cmdline(pid))[:200]}")
        for host in self.hosts.values():
            try:
                ns = host.sshd.ns_file.read_text().strip()
            except OSError:
                continue
            if ns and ns != procs.own_mnt_ns():
                for pid in procs.pids_in_ns(ns, host.sshd.is_member):
                    found.append(f"process {pid} still in {host.name}'s namespace {ns}")
        for point in procs.mounts_under(self.state_dir):
            found.append(f"mount still present: {point}")
        return found

    def save_logs(self, dest: Path) -> list[Path]:
        """Copy every host's logs (``*.log``) to ``dest/<host>/`` before the files go (post-mortems of
        CI runs: ``ESXISIM_KEEP_LOGS`` in the pytest fixture); returns the copies."""
        copied = []
        for host in self.hosts.values():
            for log in sorted(host.dir.glob("*.log")):
                target = dest / host.name / log.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, target)
                copied.append(target)
        return copied

    def remove_files(self) -> None:
        if not self.state_dir.exists():
            return
        if self._own_dir:
            shutil.rmtree(self.state_dir)
            return
        self.lab_json.unlink(missing_ok=True)
        if (self.state_dir / "hosts").exists():
            shutil.rmtree(self.state_dir / "hosts")
        with contextlib.suppress(OSError):
            self.state_dir.rmdir()

    # -- faults that need more than the host process

    def ssh_drop(self, name: str) -> int:
        """Kill the host's live SSH sessions (connections drop mid-transfer); return how many processes."""
        return self.host(name).sshd.kill_sessions()

    def host_down(self, name: str) -> None:
        """Close the host's API listener and stop its sshd; VM state stays in the Go process."""
        host = self.host(name)
        host.client(timeout=30).fault("api-down")
        host.sshd.stop()

    def host_up(self, name: str) -> None:
        """Start the host's sshd again (same port and keys) and reopen its API listener."""
        host = self.host(name)
        if not host.sshd.listener_alive():
            host.sshd.start(host.ssh_port())
        host.client(timeout=30).fault("api-up")

    def fault(self, name: str, kind: str, **options: Any) -> dict[str, Any]:
        """Inject a fault (docs/lab.md): ssh-drop, host-down and host-up here, the rest in the host."""
        if kind == "ssh-drop":
            return {"ok": True, "killed": self.ssh_drop(name)}
        if kind == "host-down":
            self.host_down(name)
            return {"ok": True}
        if kind == "host-up":
            self.host_up(name)
            return {"ok": True}
        answer = self.client(name, timeout=30).fault(kind, **options)
        if kind == "clear":
            host = self.host(name)
            if not host.sshd.listener_alive():
                host.sshd.start(host.ssh_port())
        return answer
