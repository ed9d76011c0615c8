"""Typed errors of the ESXi access layer (API, SSH, transport).

Everything raised on purpose by :mod:`reconciler.esxi` derives from :class:`EsxiError`, so the engine
can tell "the host said no" from a bug. Messages never contain secrets.
"""

from __future__ import annotations


class EsxiError(Exception):
    """Base class of every error of the ESXi access layer."""


class NotPinnedError(EsxiError):
    """A connection was refused because no certificate thumbprint / host key is pinned."""


class PinMismatchError(EsxiError):
    """The host presented another certificate or host key than the pinned one."""


class ApiError(EsxiError):
    """A vSphere API call failed (the original fault is the ``__cause__``)."""


class TaskTimeoutError(ApiError):
    """A vim.Task did not finish in time; it may still be running (``task``)."""

    def __init__(self, message: str, task: object = None):
        self.task = task
        super().__init__(message)


class RestrictedByLicenseError(ApiError):
    """``vim.fault.RestrictedVersion``: the host's licence (free ESXi) forbids this API method."""


class ShellError(EsxiError):
    """SSH connection, authentication or transport failure."""


class ShellAuthError(ShellError):
    """SSH login refused or the private key unusable: waiting and retrying does not fix it."""


class CommandError(ShellError):
    """A remote command failed (non-zero exit or a vim-cmd fault in its output)."""

    def __init__(self, command: str, exit_status: int, stdout: str, stderr: str, fault: str | None = None):
        self.command = command
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        self.fault = fault
        detail = (fault or stderr.strip() or stdout.strip())[-500:]
        super().__init__(f"{command[:200]} failed (exit {exit_status}): {detail}")


class PowerStateTimeoutError(EsxiError):
    """A VM did not reach the expected power state in time (e.g. the guest ignored a shutdown)."""


class SnapshotError(EsxiError):
    """Creating, finding or removing a snapshot failed."""


class SnapshotTimeoutError(SnapshotError):
    """Creating a snapshot took longer than allowed; it may still appear on the host."""


class ForeignSnapshotError(SnapshotError):
    """The VM has snapshots that are not ours; a hot backup of it is refused."""


class ChainNotCleanError(SnapshotError):
    """After removing our snapshot the disk chain is not back where it was (consolidation needed)."""


class InsufficientSpaceError(EsxiError):
    """A datastore has less free space than the host's limits demand."""


class FullBackupNeededError(EsxiError):
    """Changed areas cannot be trusted or computed; the caller must read the whole disk.

    ``reason`` is a short machine-friendly word (``no-change-id``, ``cbt-inactive``, ``change-id-rejected``,
    ``restricted``, ``capacity-changed``, ``digest-mismatch``), the message says more.
    """

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"full read needed ({reason}): {message}")


class UnsupportedDiskError(EsxiError):
    """A disk this layer cannot read (e.g. a frozen file that is a delta, an RDM, several extents)."""


class ProtocolError(EsxiError):
    """A host answered in a form we do not understand (parser or stream format)."""
