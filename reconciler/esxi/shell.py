"""SSH to an ESXi host with paramiko: pinned host key, key or password login, quoted commands, streams.

* **Pinning**: the server's host key must have the configured ``SHA256:…`` fingerprint (as printed by
  ``ssh-keygen -lf``), compared in constant time right after the key exchange and before any
  credential is sent; :class:`PinMismatchError` otherwise. A host has several keys (RSA, ECDSA …) and
  the pin names one: when the negotiated key is another type, we reconnect with that type disabled,
  so the pinned key is found whatever paramiko prefers. No known_hosts file is read or written.
  Unpinned connections need ``insecure_skip_host_key_check`` (a loud warning is logged).
* **Login**: the private key (OpenSSH format) if configured, else the password; paramiko falls back
  from ``password`` to ``keyboard-interactive`` by itself (ESXi offers only the latter).
* **Commands**: :meth:`ShellConnection.run` takes an argv (each element quoted with
  :func:`shlex.quote`, correct for BusyBox ``ash``; a line break stays inside its single quotes, so
  names and paths holding one pass as one argument; NUL is refused) or a prepared line built with
  :func:`reconciler.esxi.vimcmd.command_line` (refused if it holds a line break outside quotes).
* **Streams** (:meth:`ShellConnection.stream`): stdout read in bounded pieces; paramiko buffers at
  most one channel window (2 MiB by default) per channel.
* **Rekeying**: paramiko renegotiates keys after 512 MiB per direction. A rekey while several threads
  read channels of one transport with enlarged windows was seen to stall ("Key-exchange timed out
  waiting for key negotiation"). Bulk transfers therefore use **one connection per stream** and one
  reader thread per connection, with paramiko's default window; transfers over 600 MiB through one
  connection are covered by an integration test.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import paramiko

from reconciler.esxi.errors import (
    CommandError,
    NotPinnedError,
    PinMismatchError,
    ShellAuthError,
    ShellError,
    transient_os_error,
)
from reconciler.esxi.vimcmd import command_line, find_fault, line_breaks_quoted

log = logging.getLogger(__name__)

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
_KEY_FAMILIES = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
}


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64 without padding>`` of the key blob, as ``ssh-keygen -lf`` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def load_private_key(text: str, passphrase: str | None = None) -> paramiko.PKey:
    """A paramiko key from OpenSSH/PEM text (Ed25519, ECDSA or RSA)."""
    errors = []
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text), password=passphrase)
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{cls.__name__}: {type(exc).__name__}")
    raise ShellAuthError("cannot load the SSH private key (" + "; ".join(errors) + ")")


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in. Secrets are callables so they are read only when needed."""

    address: str
    port: int
    user: str
    host_key: str | None
    insecure_skip_host_key_check: bool = False
    password: Callable[[], str] | None = None
    private_key: Callable[[], str] | None = None
    timeout: float = 20.0


@dataclass(frozen=True)
class ShellResult:
    """Exit status and output of a finished command."""

    command: str
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


def to_line(command: Sequence[str] | str) -> str:
    """A shell line: an argv is quoted element by element; a str is taken as already built (with
    :func:`~reconciler.esxi.vimcmd.command_line`) and refused if a line break in it is not quoted."""
    if isinstance(command, str):
        if not line_breaks_quoted(command):
            raise ValueError(f"refusing an unquoted line break or NUL in a remote command: {command[:60]!r}")
        return command
    return command_line(command)


def _connect_transport(target: SshTarget, window_size: int | None) -> paramiko.Transport:
    disabled: list[str] = []
    for _attempt in range(len(_KEY_FAMILIES)):
        try:
            sock = socket.create_connection((target.address, target.port), timeout=target.timeout)
        except OSError as exc:
            raise ShellError(
                f"cannot reach SSH on {target.address}:{target.port}: {exc}",
                host=target.address,
                transient=transient_os_error(exc),
            ) from exc
        # Without TCP_NODELAY every channel open waits ~40 ms (Nagle + delayed ACK): seen in the lab.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kwargs: dict[str, object] = {"disabled_algorithms": {"keys": list(disabled)}}
        if window_size:
            kwargs["default_window_size"] = window_size
        transport = paramiko.Transport(sock, **kwargs)  # type: ignore[arg-type]
        try:
            opts = transport.get_security_options()
            supported = tuple(c for c in PREFERRED_CIPHERS if c in opts.ciphers)
            opts.ciphers = supported + tuple(c for c in opts.ciphers if c not in supported)
            transport.start_client(timeout=target.timeout)
            key = transport.get_remote_server_key()
            got = host_key_fingerprint(key)
            where = f"{target.address}:{target.port}"
            if target.host_key is None:
                if not target.insecure_skip_host_key_check:
                    raise NotPinnedError(f"no SSH host key pinned for {where}; set ssh.host_key")
                log.warning(
                    "INSECURE: SSH to %s WITHOUT checking its host key (insecure_skip_host_key_check);"
                    " it presented %s %s. Pin it with ssh.host_key.",
                    where, key.get_name(), got,
                )  # fmt: skip
                return transport
            if hmac.compare_digest(got.encode(), target.host_key.strip().encode()):
                return transport
            family = _KEY_FAMILIES.get(key.get_name(), (key.get_name(),))
            transport.close()
            disabled.extend(family)
            log.debug("host key %s %s is not the pinned one; trying another key type", key.get_name(), got)
        except (PinMismatchError, NotPinnedError):
            transport.close()
            raise
        except (paramiko.SSHException, EOFError, OSError) as exc:
            transport.close()
            if disabled and isinstance(exc, paramiko.SSHException):  # no more key types the server offers
                break
            raise ShellError(
                f"SSH handshake with {target.address}:{target.port} failed: {exc}", host=target.address
            ) from exc
        except BaseException:
            transport.close()
            raise
    raise PinMismatchError(
        f"{target.address}:{target.port} has no SSH host key with the pinned fingerprint {target.host_key};"
        " refusing to connect (possible man in the middle)"
    )


def _authenticate(transport: paramiko.Transport, target: SshTarget) -> None:
    errors = []
    if target.private_key is not None:
        try:
            transport.auth_publickey(target.user, load_private_key(target.private_key()))
            return
        except (paramiko.SSHException, EOFError, OSError) as exc:
            errors.append(f"publickey: {exc}")
    if target.password is not None and transport.is_active():
        try:
            transport.auth_password(target.user, target.password(), fallback=True)
            return
        except (paramiko.SSHException, EOFError, OSError) as exc:
            errors.append(f"password: {exc}")
    if not errors:
        errors.append("no private key or password configured")
    raise ShellAuthError(
        f"SSH login as {target.user} on {target.address} failed: " + "; ".join(errors), host=target.address
    )


NO_EXIT_STATUS = -1
"""What paramiko reports when a session closed without an exit status (connection lost, command killed)."""


def send_all(channel: paramiko.Channel, data: bytes) -> None:
    """``channel.sendall(data)`` without its copying: paramiko's loop keeps ``data[sent:]``, a new copy
    of the rest after every 32 KiB packet, so one 1 MiB write copied about 16 MiB (on a restore, more
    client CPU than the encryption). A memoryview is sliced without copying, and paramiko's message
    takes it as it is."""
    view = memoryview(data)
    while view:
        sent = channel.send(view)  # type: ignore[arg-type]  # the stubs say bytes; paramiko takes any buffer
        if sent <= 0:
            raise EOFError("the channel was closed while sending")
        view = view[sent:]


def read_exactly(read: Callable[[int], bytes], size: int, where: str, what: str) -> bytes:
    """Exactly ``size`` bytes from ``read``; ShellError naming ``where`` and ``what`` (the command) if
    the stream ends first: the SSH connection was lost or the remote command ended."""
    parts = []
    left = size
    while left:
        chunk = read(min(left, 1 << 20))
        if not chunk:
            raise ShellError(
                f"SSH to {where}: the connection was lost or the remote command ended {left} bytes early"
                f" ({what})"
            )
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class RemoteStream:
    """stdout of a running remote command, read in pieces; :meth:`close` checks the exit status."""

    def __init__(self, channel: paramiko.Channel, command: str, timeout: float, where: str = "") -> None:
        self.channel = channel
        self.command = command
        self.timeout = timeout
        self.where = where
        """``address:port`` of the host, named in errors."""
        channel.settimeout(timeout)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (b"" at the end of the stream)."""
        try:
            return self.channel.recv(size)
        except TimeoutError as exc:
            raise ShellError(f"no data from {self.command[:120]} for {self.timeout} s") from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            # The connection dropped mid-read (paramiko raises EOFError while acknowledging data):
            # a ShellError, so readers retry the piece on a new connection like any other drop.
            raise ShellError(f"{self.command[:120]}: connection lost while reading: {exc!r}") from exc

    def read_exact(self, size: int) -> bytes:
        """Exactly ``size`` bytes; ShellError if the stream ends first."""
        return read_exactly(self.read, size, self.where or "the host", self.command[:60])

    def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin."""
        try:
            send_all(self.channel, data)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ShellError(
                f"SSH to {self.where or 'the host'}: the connection was lost while sending ({exc})"
                f" ({self.command[:60]})"
            ) from exc

    def abort(self) -> None:
        """Close the channel at once (the remote command sees its stdin end)."""
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            self.channel.close()

    def close_stdin(self) -> None:
        try:
            self.channel.shutdown_write()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ShellError(f"{self.command[:120]}: closing stdin failed: {exc}") from exc

    def close(self, check: bool = True) -> int:
        """Wait for the exit status (raising CommandError if non-zero and ``check``)."""
        deadline = time.monotonic() + self.timeout
        try:
            while not self.channel.exit_status_ready():
                if time.monotonic() > deadline:
                    self.channel.close()
                    raise ShellError(f"{self.command[:120]}: no exit status after {self.timeout} s")
                while self.channel.recv_ready():  # drain what the caller did not read
                    self.channel.recv(1 << 16)
                self.channel.status_event.wait(0.05)
            status = self.channel.recv_exit_status()
            stderr = b""
            while self.channel.recv_stderr_ready():
                stderr += self.channel.recv_stderr(1 << 16)
            self.channel.close()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ShellError(
                f"{self.command[:120]}: connection lost before the exit status: {exc!r}"
            ) from exc
        if status == NO_EXIT_STATUS:
            raise ShellError(
                f"SSH to {self.where or 'the host'}: the connection was lost or the remote command was killed"
                f" (no exit status) ({self.command[:60]})"
            )
        if check and status != 0:
            raise CommandError(self.command, status, "", stderr.decode("utf-8", "replace"))
        return status


class ShellConnection:
    """One authenticated SSH connection (one paramiko Transport)."""

    def __init__(self, target: SshTarget, *, window_size: int | None = None) -> None:
        self.target = target
        self.transport = _connect_transport(target, window_size)
        try:
            _authenticate(self.transport, target)
        except BaseException:
            self.transport.close()
            raise

    @property
    def active(self) -> bool:
        return self.transport.is_active()

    def dropped(self, settle: float = 5.0) -> bool:
        """Whether the connection is gone, asked after an error on it. paramiko can hand the error to the
        caller (a write to the dead socket, a woken channel) before its transport thread has seen the end
        of the connection and marked it inactive; a still-active transport gets up to ``settle`` seconds
        to end before the connection is taken for alive (and the error for one of the command's)."""
        if self.transport.is_active():
            self.transport.join(settle)
        return not self.transport.is_active()

    def close(self) -> None:
        self.transport.close()

    def _open(self, line: str, timeout: float) -> paramiko.Channel:
        try:
            channel = self.transport.open_session(timeout=timeout)
            channel.exec_command(line)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ShellError(f"SSH channel to {self.target.address} failed: {exc}") from exc
        return channel

    def run(
        self,
        command: Sequence[str] | str,
        *,
        timeout: float = 120.0,
        stdin: bytes | None = None,
        check: bool = True,
        max_output: int = 64 << 20,
    ) -> ShellResult:
        """Run a command to its end and return its output (bounded by ``max_output``).

        ``check``: raise CommandError on a non-zero exit or on a vim-cmd fault in the output.
        """
        line = to_line(command)
        channel = self._open(line, timeout)
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            channel.settimeout(timeout)  # bounds sendall when the command does not read its stdin
            if stdin is not None:
                send_all(channel, stdin)
            channel.shutdown_write()
            while True:
                if channel.recv_ready():
                    out += channel.recv(1 << 16)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(1 << 16)
                elif channel.exit_status_ready():
                    break
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ShellError(f"{line[:120]}: timed out after {timeout} s")
                    select.select([channel], [], [], min(left, 0.05))
                if len(out) + len(err) > max_output:
                    raise ShellError(f"{line[:120]}: more than {max_output} bytes of output")
            status = channel.recv_exit_status()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise ShellError(f"{line[:120]}: SSH failed: {exc}") from exc
        finally:
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                channel.close()  # of a dead connection raises too; the error above is the one to tell
        if status == NO_EXIT_STATUS:  # the session ended without one: not the command's answer
            raise ShellError(
                f"SSH to {self.target.address}:{self.target.port}: the connection was lost or the remote"
                f" command was killed (no exit status) ({line[:60]})",
                host=self.target.address,
            )
        result = ShellResult(line, status, bytes(out), bytes(err))
        if check:
            fault = find_fault(result.text)
            if status != 0 or fault is not None:
                what = fault.describe() if fault else None
                raise CommandError(line, status, result.text, result.error_text, what)
        return result

    @contextlib.contextmanager
    def stream(self, command: Sequence[str] | str, *, timeout: float = 120.0) -> Iterator[RemoteStream]:
        """Start a command and yield its stdout as a :class:`RemoteStream`; the exit status is checked
        when the block ends normally."""
        line = to_line(command)
        where = f"{self.target.address}:{self.target.port}"
        stream = RemoteStream(self._open(line, timeout), line, timeout, where)
        try:
            yield stream
        except BaseException:
            # Closing a channel of a dead connection raises too; the original error is the one to tell.
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                stream.channel.close()
            raise
        stream.close(check=True)


class ShellSession:
    """A reusable control connection (reconnected when it dropped) plus a factory of extra connections
    for parallel streams."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self._conn: ShellConnection | None = None
        self._lock = threading.Lock()

    def connection(self) -> ShellConnection:
        """The control connection, (re)connected if needed."""
        with self._lock:
            if self._conn is None or not self._conn.active:
                if self._conn is not None:
                    self._conn.close()
                self._conn = ShellConnection(self.target)
            return self._conn

    def new_connection(self, *, window_size: int | None = None) -> ShellConnection:
        """A separate connection (e.g. one per transfer stream); the caller closes it."""
        return ShellConnection(self.target, window_size=window_size)

    def run(
        self,
        command: Sequence[str] | str,
        *,
        timeout: float = 120.0,
        stdin: bytes | None = None,
        check: bool = True,
        retry: bool = True,
    ) -> ShellResult:
        """Run on the control connection. With ``retry`` (only for idempotent commands) a dropped
        connection is re-established and the command run again (3 attempts, growing pauses)."""
        attempts = 3 if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return self.connection().run(command, timeout=timeout, stdin=stdin, check=check)
            except CommandError:
                raise
            except ShellError:
                conn = self._conn
                if attempt == attempts or (conn is not None and not conn.dropped()):
                    raise
                log.info("SSH connection to %s dropped; reconnecting", self.target.address)
                time.sleep(0.5 * (attempt - 1))
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
