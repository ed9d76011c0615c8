"""A simulated host's OpenSSH server: keys, password, sshd_config, and the sshd process in its namespace.

Files in ``HOSTDIR/ssh`` (bind-mounted read-only at ``/etc/ssh`` inside the host's root)::

    sshd_config                         Port, ListenAddress 127.0.0.1, keys, SetEnv PATH/ESXISIM_SOCKET ...
    ssh_host_ecdsa_key[.pub]            ECDSA nistp256 host key (the pinned one) and an RSA 2048 one,
    ssh_host_rsa_key[.pub]              as ESXi generates at first boot
    id_ed25519[.pub], authorized_keys   the client key that tests and the product use
    password                            root's password (0600), also the API password
    shadow                              a copy of /etc/shadow whose root entry has that password
    known_hosts                         ``[127.0.0.1]:PORT`` lines for both host keys
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from esxisim import REPO_DIR, procs
from esxisim.nsroot import CONTROL_MOUNT, TOOLS_MOUNT

HOST_KEY_TYPE = "ecdsa-sha2-nistp256"
CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)


class SshError(RuntimeError):
    """sshd could not be set up or started."""


@dataclass(frozen=True)
class SshPaths:
    """Where a host's SSH files live."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def ecdsa_key(self) -> Path:
        return self.dir / "ssh_host_ecdsa_key"

    @property
    def rsa_key(self) -> Path:
        return self.dir / "ssh_host_rsa_key"

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def password(self) -> Path:
        return self.dir / "password"

    @property
    def shadow(self) -> Path:
        return self.dir / "shadow"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"


def _run(argv: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SshError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def keygen(path: Path, kind: str, bits: int | None = None, comment: str = "esxisim") -> None:
    """Create an unencrypted key pair at ``path`` / ``path.pub`` unless it exists."""
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
    if bits is not None:
        argv[4:4] = ["-b", str(bits)]
    _run(argv)


def public_key(path: Path) -> tuple[str, str]:
    """(type, base64 blob) of the public key next to private key ``path``."""
    kind, blob = path.with_name(path.name + ".pub").read_text().split()[:2]
    return kind, blob


def fingerprint(blob_b64: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a base64 public-key blob."""
    digest = hashlib.sha256(base64.b64decode(blob_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def password_hash(password: str) -> str:
    """A SHA-512 crypt hash of ``password`` (``openssl passwd -6``)."""
    return _run(["openssl", "passwd", "-6", "-stdin"], stdin=password + "\n").strip()


def shadow_text(password: str, real: Path = Path("/etc/shadow")) -> str:
    """The real shadow file with root's hash replaced (the real file is only read)."""
    hashed = password_hash(password)
    lines = real.read_text().splitlines() if real.exists() else []
    out = []
    done = False
    for line in lines:
        fields = line.split(":")
        if fields and fields[0] == "root" and len(fields) >= 2:
            fields[1] = hashed
            if len(fields) > 2:
                fields[2] = str(int(time.time() // 86400))
            line = ":".join(fields)
            done = True
        out.append(line)
    if not done:
        out.insert(0, f"root:{hashed}:{int(time.time() // 86400)}:0:99999:7:::")
    return "\n".join(out) + "\n"


def sshd_config(port: int) -> str:
    """sshd_config as seen inside the host's root (the ssh dir is /etc/ssh there)."""
    return "\n".join(
        [
            "# esxisim: sshd of one simulated ESXi host (runs chrooted in a private mount namespace)",
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            "HostKey /etc/ssh/ssh_host_ecdsa_key",
            "HostKey /etc/ssh/ssh_host_rsa_key",
            "PidFile /run/sshd.pid",
            "AuthorizedKeysFile /etc/ssh/authorized_keys",
            "PermitRootLogin yes",
            "PubkeyAuthentication yes",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication yes",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            f"Ciphers {CIPHERS}",
            f"SetEnv PATH={TOOLS_MOUNT}:/usr/bin:/bin ESXISIM_SOCKET={CONTROL_MOUNT}/control.sock",
            "Subsystem sftp internal-sftp",
            # every command goes through the recorder, which records only while a test asks (record.py)
            f"ForceCommand {TOOLS_MOUNT}/record/esxisim-session",
            "LogLevel ERROR",
            "",
        ]
    )


def prepare(paths: SshPaths, port: int, password: str) -> None:
    """Write every SSH file of a host (keys are kept if they already exist, so host-up reuses them)."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    keygen(paths.ecdsa_key, "ecdsa", 256, "root@esxisim")
    keygen(paths.rsa_key, "rsa", 2048, "root@esxisim")
    keygen(paths.client_key, "ed25519", None, "esxisim-client")
    kind, blob = public_key(paths.client_key)
    paths.authorized_keys.write_text(f"{kind} {blob} esxisim-client\n")
    fd = os.open(paths.password, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    paths.password.chmod(0o600)
    fd = os.open(paths.shadow, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as fh:
        fh.write(shadow_text(password))
    set_port(paths, port)
    # sshd and ssh inside the root read these from /etc/ssh, which the ssh dir replaces there
    for name in ("moduli", "ssh_config"):
        src = Path("/etc/ssh") / name
        if src.exists() and not (paths.dir / name).exists():
            shutil.copyfile(src, paths.dir / name)


def set_port(paths: SshPaths, port: int) -> None:
    """Write the port-dependent files: sshd_config and known_hosts."""
    paths.config.write_text(sshd_config(port))
    lines = []
    for key in (paths.ecdsa_key, paths.rsa_key):
        kind, blob = public_key(key)
        lines.append(f"[127.0.0.1]:{port} {kind} {blob}\n")
    paths.known_hosts.write_text("".join(lines))


LOWEST_PORT = 10000


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (and ``bind`` to port 0)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, at random *outside* the ephemeral range.

    sshd binds the port seconds later, and a host that goes down and up again binds it again: a port
    from the ephemeral range may meanwhile be the local end of any outgoing connection of the machine
    (another lab's tests make thousands). Outside it, only someone choosing the same way can take it,
    and :meth:`Sshd.start` then notices that the listener is not its own.
    """
    low, high = ephemeral_ports()
    ranges = [(LOWEST_PORT, low - 1), (high + 1, 65535)]
    candidates = [r for r in ranges if r[1] - r[0] >= 1000]
    rnd = random.SystemRandom()
    for _ in range(100 if candidates else 0):
        first, last = rnd.choice(candidates)
        port = rnd.randint(first, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: a port in TIME_WAIT counts as used
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, pid: int, timeout: float, log: Path) -> None:
    """Wait until sshd ``pid`` itself listens on ``port`` and sends its banner; fail early if it died.

    Whose listener it is matters: if another lab's sshd got the port first, a banner comes from that one
    while ours fails its bind ("Address already in use", which :meth:`SimHost.start_sshd` handles).
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not procs.alive(pid):
            procs.reap(pid)
            raise SshError(f"sshd (pid {pid}) exited while starting; log {log}:\n{_tail(log)}")
        if not procs.listens_on(pid, port):
            time.sleep(0.05)
            continue
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    # identify before hanging up, or sshd logs a kex_exchange_identification error
                    s.sendall(b"SSH-2.0-esxisim-probe\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise SshError(
        f"sshd on port {port} did not answer within {timeout:.0f}s ({last}); log {log}:\n{_tail(log)}"
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Sshd:
    """The sshd of one host: started in its own mount namespace, found again through pid and ns files."""

    def __init__(self, host_dir: Path) -> None:
        self.host_dir = host_dir
        self.paths = SshPaths(host_dir / "ssh")
        self.pid_file = host_dir / "sshd.pid"
        self.ns_file = host_dir / "sshd.ns"
        self.log = host_dir / "sshd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.die_with_parent = False

    def start(self, port: int, timeout: float = 20.0) -> int:
        """Start sshd and wait for its banner; return its pid."""
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(REPO_DIR),
            "LANG": "C.UTF-8",
        }
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    "-m",
                    "esxisim.nsroot",
                    str(self.host_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd="/",
                start_new_session=True,
                preexec_fn=procs.die_with_parent if self.die_with_parent else None,
            )
        pid = self._proc.pid
        self.pid_file.write_text(f"{pid}\n")
        wait_banner(port, pid, timeout, self.log)
        ns = procs.mnt_ns(pid)
        if ns is None or ns == procs.own_mnt_ns():
            raise SshError(f"sshd (pid {pid}) is not in a private mount namespace")
        self.ns_file.write_text(ns + "\n")
        return pid

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _ns(self) -> str | None:
        try:
            return self.ns_file.read_text().strip() or None
        except OSError:
            return None

    def is_member(self, pid: int) -> bool:
        """True if ``pid`` belongs to this host's sshd: chrooted into the host's root (or below it: sshd's
        pre-auth child is in /run/sshd), or (before the chroot) the launcher naming the host's directory.

        Checked besides the namespace id, which is no name: the kernel gives a dead namespace's id to the
        next namespace made (another lab's sshd, say), and a stale pid file may name anyone's process.
        """
        root = str(self.host_dir / "root")
        chroot = procs.root_dir(pid)
        if chroot is not None and (chroot == root or chroot.startswith(root + "/")):
            return True
        return str(self.host_dir) in procs.cmdline(pid)

    def listener_alive(self) -> bool:
        pid = self._pid()
        return (
            pid is not None and procs.alive(pid) and procs.mnt_ns(pid) == self._ns() and self.is_member(pid)
        )

    def kill_sessions(self) -> int:
        """Kill the SSH sessions live right now (every process of the host but the listener): they drop
        at once, as in a network drop. Connections made meanwhile are not touched.

        Returns how many processes were killed.
        """
        ns = self._ns()
        pid = self._pid()
        if ns is None or pid is None:
            return 0
        victims = [p for p in procs.pids_in_ns(ns, self.is_member) if p != pid]
        left = procs.kill_trees(victims)
        if left:
            raise SshError(f"session processes {left} of {self.host_dir.name} survived SIGKILL")
        return len(victims)

    def stop(self) -> None:
        """Stop the listener and everything in its namespace; the namespace's mounts go with them."""
        pid = self._pid()
        ns = self._ns()
        if pid is not None and not (procs.alive(pid) and self.is_member(pid)):
            pid = None  # gone, or the pid of someone else's process by now
        if ns is None and pid is not None:
            # started but not yet recorded
            other = procs.mnt_ns(pid)
            if other is not None and other != procs.own_mnt_ns():
                ns = other
            else:
                procs.end_processes([pid])
        if pid is not None and ns is not None and procs.mnt_ns(pid) == ns:
            procs.end_processes([pid], term_timeout=2.0)
        if ns is not None:
            left = procs.kill_namespace(ns, member=self.is_member)
            if left:
                raise SshError(f"processes {left} of {self.host_dir.name}'s sshd namespace survived SIGKILL")
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None
        elif pid is not None:
            procs.reap(pid)
        self.pid_file.unlink(missing_ok=True)
        self.ns_file.unlink(missing_ok=True)
