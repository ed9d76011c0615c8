"""Bulk streams through the OpenSSH client binary, logged in and pinned like the paramiko connection.

Why: paramiko's packet layer is Python, one call per 32 KiB packet. Sending 2 GiB to ``cat >/dev/null``
on the lab host over 4 connections took 6.05 s and 5.7 s of client CPU through paramiko, 2.32 s and 2.0 s
(``ssh`` included) through ``ssh`` with AES-GCM in C. On a restore that CPU is shared with decoding the
chunks, so bulk disk writes go through ``ssh`` when it is there and works; control commands stay on
paramiko (:mod:`.shell`), which also remains the fallback for everything here.

Trust is exactly paramiko's: :meth:`OpenSsh.start` takes the host key that a :class:`~.shell.ShellConnection`
has already checked against the pin (or accepted under ``insecure_skip_host_key_check``) and gives ``ssh``
a known_hosts of that one key under a fixed alias, with ``StrictHostKeyChecking=yes`` and only that key's
algorithms: ``ssh`` connects to the host holding that key or not at all. No user or system ssh config is
read (``-F /dev/null``), so a ``ProxyCommand``, ``ControlMaster`` or agent of the machine's user never
applies.

Secrets never reach argv, the environment or a named file: the private key and the password are written
into memfds (``memfd_create``: RAM only, no name, gone with this process), which ``ssh`` opens as
``/proc/<pid>/fd/<n>`` (our pid: ``ssh`` closes inherited descriptors at start). ESXi answers a password
by keyboard-interactive; ``ssh`` asks ``SSH_ASKPASS`` (forced), a two-line script in a private directory
that prints the password memfd.

When ``ssh`` is missing, or the first login through it fails (an old host, a key format it does not
read), :meth:`OpenSsh.start` logs why and returns None, and the caller uses paramiko.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from reconciler.esxi.errors import CommandError, ShellError
from reconciler.esxi.shell import ShellConnection, read_exactly, to_line

log = logging.getLogger(__name__)

HOST_ALIAS = "esxi-reconciler-host"
"""The name the pinned key is filed under in the one-line known_hosts (``HostKeyAlias``)."""
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr,chacha20-poly1305@openssh.com"
"""Our preference (the client's order decides): AES-GCM is the cheapest with AES-NI on both ends; ESXi's
sshd offers AES-GCM and AES-CTR (no ChaCha20 in its FIPS mode)."""
_HOST_KEY_ALGORITHMS = {
    "ssh-rsa": "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
}
"""Signature algorithms of a host key type where they differ from its name."""
_PIPE_SIZE = 1 << 20
"""The pipe to ``ssh`` is enlarged to this (the Linux default maximum): fewer wake-ups per MiB."""
_PROBE_TIMEOUT = 30.0


def _memfd(name: str, data: bytes) -> int:
    """A private in-memory file holding ``data`` (mode 0600: ``ssh`` refuses a key others could read)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _last_line(text: bytes) -> str:
    lines = [line.strip() for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class ProcessStream:
    """A remote command's stdin and stdout through an ``ssh`` process; the same methods as
    :class:`~.shell.RemoteStream`. Every wait is bounded by ``timeout`` (a host that stops taking data
    fails the write instead of hanging it)."""

    def __init__(
        self, proc: subprocess.Popen[bytes], stderr: IO[bytes], command: str, timeout: float, where: str
    ):
        self.proc = proc
        self.command = command
        self.timeout = timeout
        self.where = where
        self._stderr = stderr
        assert proc.stdin is not None and proc.stdout is not None
        self._in: int | None = proc.stdin.fileno()
        self._out = proc.stdout.fileno()
        os.set_blocking(self._in, False)
        for fd in (self._in, self._out):
            with contextlib.suppress(OSError):  # a lower pipe-max-size only costs wake-ups
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)

    def _wait_for(self, fd: int, event: int) -> None:
        poller = select.poll()
        poller.register(fd, event)
        if not poller.poll(self.timeout * 1000):
            raise ShellError(
                f"SSH to {self.where}: no progress for {self.timeout:.0f} s ({self.command[:60]})",
                host=self.where,
            )

    def _ended(self, doing: str) -> ShellError:
        """The error for a pipe that broke: ``ssh``'s own (exit 255: the connection) or the command's."""
        try:
            status = self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.abort()
            status = 255
        failure = self._failure(status, f"the connection was lost while {doing}")
        assert failure is not None  # ssh ended while we wrote: never with 0
        return failure

    def _failure(self, status: int, lost: str) -> ShellError | None:
        """What a non-zero exit status means: ``ssh``'s own failure (255: ``lost``, with its message) or
        the remote command's (CommandError with its stderr); None for 0."""
        said = self._stderr_text()
        if status == 255:
            return ShellError(
                f"SSH to {self.where}: {lost} ({_last_line(said)}) ({self.command[:60]})", host=self.where
            )
        if status != 0:
            return CommandError(self.command, status, "", said.decode("utf-8", "replace"), host=self.where)
        return None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin."""
        if self._in is None:
            raise ShellError(f"{self.command[:60]}: stdin is already closed")
        view = memoryview(data).cast("B")
        while view:
            try:
                view = view[os.write(self._in, view) :]
            except BlockingIOError:
                self._wait_for(self._in, select.POLLOUT)
            except OSError as exc:  # EPIPE: ssh ended
                raise self._ended("sending") from exc

    def close_stdin(self) -> None:
        if self._in is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self._in = None

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of stdout (b"" at its end)."""
        self._wait_for(self._out, select.POLLIN)
        return os.read(self._out, size)

    def read_exact(self, size: int) -> bytes:
        """Exactly ``size`` bytes; ShellError if the stream ends first (the connection was lost or the
        command ended)."""
        try:
            return read_exactly(self.read, size, self.where, self.command[:60])
        except ShellError as exc:  # what ssh said, read only when it is needed
            raise ShellError(f"{exc} (ssh: {_last_line(self._stderr_text())})", host=self.where) from None

    def _stderr_text(self) -> bytes:
        self._stderr.seek(0)
        return self._stderr.read(64 << 10)

    def close(self, check: bool = True) -> int:
        """Wait for the exit status, discarding stdout not read (CommandError if non-zero and ``check``;
        ShellError if ``ssh`` itself failed: exit 255)."""
        self.close_stdin()
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(self._out, select.POLLIN)
        while time.monotonic() < deadline:
            if poller.poll(100) and not os.read(self._out, 1 << 16):
                break
        try:
            status = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.abort()
            raise ShellError(
                f"SSH to {self.where}: no exit status after {self.timeout:.0f} s ({self.command[:60]})",
                host=self.where,
            ) from None
        failure = self._failure(status, "the connection was lost or the remote command was killed")
        if failure is not None and (check or status == 255):
            raise failure
        return status

    def release(self) -> None:
        """Kill ``ssh`` if it still runs and close the pipes (after :meth:`close` or an error)."""
        if self.proc.returncode is None:
            self.abort()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._in = None

    def abort(self) -> None:
        """Kill ``ssh`` (the remote command sees its stdin end)."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)


class OpenSsh:
    """Runs commands through ``ssh`` with the target, login and verified host key of a paramiko
    connection (see the module doc). :meth:`close` releases the memfds and the askpass directory."""

    def __init__(self, binary: str, conn: ShellConnection) -> None:
        target = conn.target
        key = conn.transport.get_remote_server_key()
        self.where = f"{target.address}:{target.port}"
        self.timeout = target.timeout
        self._fds: list[int] = []
        self._dir: Path | None = None
        pid = os.getpid()
        try:
            known = self._keep(
                _memfd("known_hosts", f"{HOST_ALIAS} {key.get_name()} {key.get_base64()}\n".encode())
            )
            methods: list[str] = []
            options = {
                "HostKeyAlias": HOST_ALIAS,
                "UserKnownHostsFile": f"/proc/{pid}/fd/{known}",
                "GlobalKnownHostsFile": "/dev/null",
                "StrictHostKeyChecking": "yes",
                "UpdateHostKeys": "no",
                "CheckHostIP": "no",
                "HostKeyAlgorithms": _HOST_KEY_ALGORITHMS.get(key.get_name(), key.get_name()),
                "Ciphers": CIPHERS,
                "Compression": "no",
                "IPQoS": "throughput",
                "ConnectTimeout": str(max(1, round(target.timeout))),
                "ServerAliveInterval": "15",
                "ServerAliveCountMax": "4",
                "IdentitiesOnly": "yes",
                "IdentityAgent": "none",
                "IdentityFile": "none",
                "LogLevel": "ERROR",
                "NumberOfPasswordPrompts": "1",
                "PasswordAuthentication": "no",
                "KbdInteractiveAuthentication": "no",
                "BatchMode": "yes",
            }
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SSH_", "DISPLAY"))}
            if target.private_key is not None:
                keyfd = self._keep(_memfd("ssh-key", target.private_key().encode("utf-8")))
                options["IdentityFile"] = f"/proc/{pid}/fd/{keyfd}"
                methods.append("publickey")
            if target.password is not None:
                secret = self._keep(_memfd("ssh-password", target.password().encode("utf-8")))
                self._dir = Path(tempfile.mkdtemp(prefix="esxi-reconciler-ssh-"))
                askpass = self._dir / "askpass"
                askpass.write_text(f"#!/bin/sh\nexec cat /proc/{pid}/fd/{secret}\n")
                askpass.chmod(0o700)
                env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
                options.update(
                    PasswordAuthentication="yes", KbdInteractiveAuthentication="yes", BatchMode="no"
                )
                methods += ["keyboard-interactive", "password"]
            options["PreferredAuthentications"] = ",".join(methods) or "none"
        except BaseException:
            self.close()
            raise
        self._env = env
        self._argv = [binary, "-F", "/dev/null", "-T", "-x", "-a", "-p", str(target.port), "-l", target.user]
        for name, value in options.items():
            self._argv += ["-o", f"{name}={value}"]
        self._argv += ["--", target.address]

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    @classmethod
    def start(cls, conn: ShellConnection) -> OpenSsh | None:
        """An :class:`OpenSsh` for ``conn``'s host, or None (logged) when ``ssh`` is missing or cannot log
        in there; the caller then stays on paramiko."""
        binary = shutil.which("ssh")
        where = f"{conn.target.address}:{conn.target.port}"
        if binary is None:
            log.info("no ssh client on this machine; bulk transfers to %s go through paramiko", where)
            return None
        try:
            client = cls(binary, conn)
        except (OSError, ShellError) as exc:
            log.info("bulk transfers to %s go through paramiko: %s", where, exc)
            return None
        try:
            with client.stream("true", timeout=_PROBE_TIMEOUT) as probe:
                probe.close_stdin()
        except ShellError as exc:
            log.info(
                "bulk transfers to %s go through paramiko: the ssh client could not run a command: %s",
                where,
                exc,
            )
            client.close()
            return None
        return client

    @contextlib.contextmanager
    def stream(self, command: str, *, timeout: float = 120.0) -> Iterator[ProcessStream]:
        """Start ``command`` (a line, as :meth:`.shell.ShellConnection.stream` takes) and yield it; the exit
        status is checked when the block ends normally, ``ssh`` is killed when it ends with an error."""
        line = to_line(command)
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    [*self._argv, line],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    env=self._env,
                    # no controlling terminal: an ssh that cannot use the askpass script (older than
                    # OpenSSH 8.4) fails the login instead of asking the person at the terminal
                    start_new_session=True,
                )
            except OSError as exc:
                raise ShellError(f"SSH to {self.where}: cannot start ssh: {exc}", host=self.where) from exc
            stream = ProcessStream(proc, stderr, line, timeout, self.where)
            try:
                try:
                    yield stream
                except BaseException:
                    stream.abort()
                    raise
                stream.close(check=True)
            finally:
                stream.release()

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> OpenSsh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
