"""Typed errors of the ESXi access layer (API, SSH, transport).

Every error that leaves :mod:`reconciler.esxi` is an :class:`EsxiError`: the layer translates what
pyVmomi, paramiko, urllib3 and the socket library raise where it calls them (:func:`.api.mapped_faults`,
:mod:`.shell`, :mod:`.transport`), and :class:`~reconciler.esxi.host.EsxiHost` stamps its name on the
way out. So the operations never import those libraries to catch their exceptions, and they decide
about retries from two attributes, never from class names:

* :attr:`EsxiError.transient` — whether the same call may succeed in a minute (a timeout, a connection
  refused, reset or dropped, an HTTP 5xx, a host or VM busy with another task) or not (login refused,
  pin mismatch, the licence, not found, invalid state, a command that failed). A class says it for its
  kind (:attr:`EsxiError.TRANSIENT`); a wrapping error of no fixed kind (``EsxiError("power on over
  SSH: …") from ShellError``) is as transient as its cause; the raiser can say it for one instance.
* :attr:`EsxiError.host` — the host's name (its config name once it passed :class:`EsxiHost`; the
  address where only that is known), or None.

::

    EsxiError                       (as its cause)
    ├── NotPinnedError              terminal: no thumbprint / host key configured
    ├── PinMismatchError            terminal: another certificate or host key
    ├── HostConnectionError         transient: unreachable, refused, reset, timed out (not: DNS name
    │                               unknown, certificate no longer the pinned one)
    ├── ApiError                    as decided from the fault (busy, host communication: transient)
    │   ├── ApiAuthError            terminal: login refused, no permission
    │   ├── TaskTimeoutError        transient
    │   └── RestrictedByLicenseError  terminal
    ├── ShellError                  transient: SSH connection or transport failure
    │   ├── ShellAuthError          terminal
    │   ├── SshDisabledError        terminal: the operation needs SSH, the config disables it
    │   └── CommandError            terminal, unless vim-cmd reports a busy or restarting hostd
    ├── TransportError              as the HTTP status or cause says (5xx, dropped: transient)
    ├── PowerStateTimeoutError      terminal: the guest ignored the shutdown
    ├── SnapshotError               (as its cause)
    │   ├── SnapshotTimeoutError    transient
    │   ├── ForeignSnapshotError    terminal
    │   └── ChainNotCleanError      terminal: consolidation needed
    ├── InsufficientSpaceError      terminal
    ├── FullBackupNeededError       terminal (the backup handles it: full read)
    ├── UnsupportedDiskError        terminal
    └── ProtocolError               terminal: an answer we do not understand

Messages never contain secrets.
"""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
from typing import ClassVar

_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTDOWN,
    }
)


def transient_os_error(exc: BaseException) -> bool:
    """Whether a network-level failure of the standard library is worth another try: timeouts,
    connections refused, reset or dropped (a TLS connection closed under us included), unreachable
    networks, a DNS server that did not answer, an HTTP exchange cut short. Not: a host name that does
    not exist, a certificate that fails the pin, other ``OSError`` s (no space, no permission …)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return True
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    if isinstance(exc, TimeoutError | ConnectionError | http.client.HTTPException | EOFError):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


class EsxiError(Exception):
    """Base class of every error of the ESXi access layer (see the module doc)."""

    TRANSIENT: ClassVar[bool | None] = None
    """Whether errors of this class are transient; None: as their cause (terminal without one)."""

    def __init__(self, message: str, *, host: str | None = None, transient: bool | None = None) -> None:
        super().__init__(message)
        self.host = host
        self._transient = transient

    @property
    def transient(self) -> bool:
        """Whether a retry may help (see the module doc): the instance's say, else its class's, else
        its cause's."""
        if self._transient is not None:
            return self._transient
        if self.TRANSIENT is not None:
            return self.TRANSIENT
        cause = self.__cause__
        if isinstance(cause, EsxiError):
            return cause.transient
        return cause is not None and transient_os_error(cause)


class NotPinnedError(EsxiError):
    """A connection was refused because no certificate thumbprint / host key is pinned."""

    TRANSIENT = False


class PinMismatchError(EsxiError):
    """The host presented another certificate or host key than the pinned one."""

    TRANSIENT = False


class HostConnectionError(EsxiError):
    """The host could not be reached, or the connection broke (the library's error is the
    ``__cause__``); transient unless the raiser knows better (an unknown host name, a certificate that
    no longer matches the pin)."""

    TRANSIENT = True


class ApiError(EsxiError):
    """A vSphere API call failed (the original fault is the ``__cause__``)."""


class ApiAuthError(ApiError):
    """The API refused the login or the permission (``InvalidLogin``, ``NoPermission``, a session that
    stays ``NotAuthenticated`` after logging in again): waiting does not fix it."""

    TRANSIENT = False


class TaskTimeoutError(ApiError):
    """A vim.Task did not finish in time; it may still be running (``task``)."""

    TRANSIENT = True

    def __init__(self, message: str, task: object = None, *, host: str | None = None):
        self.task = task
        super().__init__(message, host=host)


class RestrictedByLicenseError(ApiError):
    """``vim.fault.RestrictedVersion``: the host's licence (free ESXi) forbids this API method."""

    TRANSIENT = False


class ShellError(EsxiError):
    """SSH connection, authentication or transport failure."""

    TRANSIENT = True


class ShellAuthError(ShellError):
    """SSH login refused or the private key unusable: waiting and retrying does not fix it."""

    TRANSIENT = False


class SshDisabledError(ShellError):
    """The operation needs SSH (a free host's writes, on-host digests), and the config disables it."""

    TRANSIENT = False


_BUSY_OUTPUT = ("vim.fault.TaskInProgress", "Connection reset by peer", "std::bad_alloc")
"""vim-cmd output that means hostd was busy or restarting (esxi-reference §2), not that the operation
is refused: another try may succeed."""


class CommandError(ShellError):
    """A remote command failed (non-zero exit or a vim-cmd fault in its output): terminal, unless the
    output says hostd was busy or restarting."""

    def __init__(
        self,
        command: str,
        exit_status: int,
        stdout: str,
        stderr: str,
        fault: str | None = None,
        *,
        host: str | None = None,
    ):
        self.command = command
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        self.fault = fault
        detail = (fault or stderr.strip() or stdout.strip())[-500:]
        busy = any(marker in text for marker in _BUSY_OUTPUT for text in (stdout, stderr, fault or ""))
        super().__init__(f"{command[:200]} failed (exit {exit_status}): {detail}", host=host, transient=busy)


class TransportError(EsxiError):
    """A disk or file transfer (HTTPS ``/folder``, ``dd`` over SSH) failed; transient when the HTTP
    status (5xx, 408, 429) or the cause (a dropped connection) says so."""


class PowerStateTimeoutError(EsxiError):
    """A VM did not reach the expected power state in time (e.g. the guest ignored a shutdown)."""

    TRANSIENT = False


class SnapshotError(EsxiError):
    """Creating, finding or removing a snapshot failed."""


class SnapshotTimeoutError(SnapshotError):
    """Creating a snapshot took longer than allowed; it may still appear on the host."""

    TRANSIENT = True


class ForeignSnapshotError(SnapshotError):
    """The VM has snapshots that are not ours; a hot backup of it is refused."""

    TRANSIENT = False


class ChainNotCleanError(SnapshotError):
    """After removing our snapshot the disk chain is not back where it was (consolidation needed)."""

    TRANSIENT = False


class InsufficientSpaceError(EsxiError):
    """A datastore has less free space than the host's limits demand."""

    TRANSIENT = False


class FullBackupNeededError(EsxiError):
    """Changed areas cannot be trusted or computed; the caller must read the whole disk.

    ``reason`` is a short machine-friendly word (``no-change-id``, ``cbt-inactive``, ``change-id-rejected``,
    ``restricted``, ``capacity-changed``, ``digest-mismatch``), the message says more.
    """

    TRANSIENT = False

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"full read needed ({reason}): {message}")


class UnsupportedDiskError(EsxiError):
    """A disk this layer cannot read (e.g. a frozen file that is a delta, an RDM, several extents)."""

    TRANSIENT = False


class ProtocolError(EsxiError):
    """A host answered in a form we do not understand (parser or stream format)."""

    TRANSIENT = False
