"""A git server for tests: bare repositories served over a real OpenSSH server, like a Gitea or GitLab
reached with a deploy key.

The sshd runs as the simulated hosts' does (:mod:`esxisim.sshd`): in a private mount namespace
(``unshare --mount``), where a tmpfs on ``/run`` gives it ``/run/sshd`` without touching the machine's
``/run``; killing the namespace ends every session. Only the deploy key may log in, and its
``authorized_keys`` line is restricted to git (``git-shell``: no shell, no forwarding, no pty), as a
forge's deploy keys are. The host key is a fresh ed25519 key that the client must pin.

Files under ``directory``::

    ssh/sshd_config, ssh/ssh_host_ed25519_key[.pub]   the server
    ssh/authorized_keys                               the deploy key, restricted to git-shell
    deploy_key[.pub]                                  the client's deploy key (what the daemon uses)
    repos/<name>.git                                  the bare repositories
    sshd.log, sshd.pid
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from esxisim import procs
from esxisim.sshd import SshError, free_port, keygen, public_key, wait_banner

SSHD = "/usr/sbin/sshd"


def _config(directory: Path, port: int) -> str:
    ssh = directory / "ssh"
    return "\n".join(
        [
            "# esxisim git server: bare repositories for the deploy key only",
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {ssh / 'ssh_host_ed25519_key'}",
            "PidFile none",
            f"AuthorizedKeysFile {ssh / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "LogLevel VERBOSE",
            "",
        ]
    )


class GitServer:
    """An sshd serving the bare repositories under ``directory/repos``. ``start()`` / ``stop()``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ssh_dir = directory / "ssh"
        self.repos = directory / "repos"
        self.deploy_key = directory / "deploy_key"
        self.log = directory / "sshd.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._ns: str | None = None

    @property
    def host_key(self) -> str:
        """The server's public host key, ``TYPE BASE64``: what a client pins."""
        kind, blob = public_key(self.ssh_dir / "ssh_host_ed25519_key")
        return f"{kind} {blob}"

    def url(self, name: str) -> str:
        """The ssh:// URL of repository ``name``."""
        return f"ssh://root@127.0.0.1:{self.port}{self.repos / name}.git"

    def create(self, name: str) -> Path:
        """A new empty bare repository ``name``; its path."""
        path = self.repos / f"{name}.git"
        subprocess.run(["git", "init", "--bare", "-q", str(path)], check=True)
        return path

    def start(self, timeout: float = 20.0) -> None:
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        self.repos.mkdir(parents=True, exist_ok=True)
        keygen(self.ssh_dir / "ssh_host_ed25519_key", "ed25519", None, "git-server")
        keygen(self.deploy_key, "ed25519", None, "deploy-key")
        kind, blob = public_key(self.deploy_key)
        restricted = 'restrict,command="git-shell -c \\"$SSH_ORIGINAL_COMMAND\\""'
        (self.ssh_dir / "authorized_keys").write_text(f"{restricted} {kind} {blob} deploy-key\n")
        self.port = free_port()
        config = self.ssh_dir / "sshd_config"
        config.write_text(_config(self.directory, self.port))
        script = (
            f"mount -t tmpfs -o mode=755 tmpfs /run && mkdir /run/sshd && exec {SSHD} -D -e -f '{config}'"
        )
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=procs.die_with_parent,
            )
        try:
            wait_banner(self.port, self._proc.pid, timeout, self.log)
        except SshError:
            self.stop()
            raise
        self._ns = procs.mnt_ns(self._proc.pid)
        if self._ns is None or self._ns == procs.own_mnt_ns():
            self.stop()
            raise SshError("the git server's sshd is not in a private mount namespace")

    def stop(self) -> None:
        """End sshd and every session of its namespace."""
        if self._proc is None:
            return
        if self._ns is not None:
            procs.kill_namespace(self._ns)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self._proc = None
        self._ns = None

    def __enter__(self) -> GitServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
