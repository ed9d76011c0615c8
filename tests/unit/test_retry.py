"""Retry within one apply: what counts as transient, exponential backoff with full jitter, no retry of
terminal failures, cancellation ends the waiting."""

from __future__ import annotations

import errno
import http.client
import ssl
import threading

import pytest
from pyVmomi import vim, vmodl

from reconciler.config.errors import ConfigError
from reconciler.config.secrets import SecretError
from reconciler.esxi.api import mapped_faults
from reconciler.esxi.errors import (
    CommandError,
    EsxiError,
    ForeignSnapshotError,
    InsufficientSpaceError,
    PinMismatchError,
    RestrictedByLicenseError,
    ShellAuthError,
    ShellError,
    SshDisabledError,
    TaskTimeoutError,
    TransportError,
)
from reconciler.operations.retry import RetryPolicy, classify
from reconciler.operations.vmlock import VmBusyError
from reconciler.repository.errors import IntegrityError, LockedError, StorageError, WrongKeyError


def wrapped(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


def api(error: BaseException) -> EsxiError:
    """What the host layer raises when a pyVmomi call raises ``error`` (its translation)."""
    try:
        with mapped_faults("list VMs", "esxi1"):
            raise error
    except EsxiError as exc:
        return exc
    raise AssertionError("not translated")


TRANSIENT = [
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    ConnectionResetError(errno.ECONNRESET, "reset"),
    TimeoutError("timed out"),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    ShellError("cannot reach SSH on 10.0.0.1:22: [Errno 111] Connection refused"),
    ShellError("vim-cmd ...: connection lost while reading: EOFError()"),
    api(ConnectionResetError("reset")),
    api(http.client.RemoteDisconnected("gone")),
    api(vmodl.fault.HostNotConnected()),  # type: ignore[no-untyped-call]
    api(vim.fault.TaskInProgress()),  # type: ignore[no-untyped-call]
    TaskTimeoutError("snapshot: task still running after 600 s"),
    TransportError("GET [ds] vm/vm-flat.vmdk: HTTP 503", transient=True),
    CommandError("vim-cmd vmsvc/power.on 1", 1, "", "Failed to login: Connection reset by peer"),
    LockedError("repository is locked exclusively by pid 1 on nas since ... (gc)"),
    VmBusyError("VM 1 on esxi1 is being backed up"),
    wrapped(EsxiError("power on VM 'x' over SSH: lost"), ShellError("connection lost")),
]

TERMINAL = [
    ForeignSnapshotError("VM has snapshots that are not ours"),
    InsufficientSpaceError("datastore1 has 1 GiB free, needs 20 GiB"),
    RestrictedByLicenseError("reconfigure: refused by the host's licence"),
    api(vim.fault.RestrictedVersion()),  # type: ignore[no-untyped-call]
    CommandError("vim-cmd vmsvc/reload 12", 1, "", "fault"),
    ConfigError([]),
    SecretError("secret file:/x cannot be read"),
    WrongKeyError("wrong passphrase"),
    IntegrityError("chunks/ab/cd", "authentication failed"),
    wrapped(StorageError("repository nas: no space left", errno.ENOSPC), OSError(errno.ENOSPC, "full")),
    PinMismatchError("host presented another certificate"),
    ShellAuthError("SSH login as root on 10.0.0.1 failed: Authentication failed."),
    SshDisabledError("host esxi1: this operation needs SSH, which is disabled in the config"),
    api(vim.fault.InvalidLogin()),  # type: ignore[no-untyped-call]
    api(vim.fault.InvalidState()),  # type: ignore[no-untyped-call]
    api(ssl.SSLCertVerificationError(1, "certificate verify failed")),
    TransportError("GET [ds] vm/vm-flat.vmdk: HTTP 404", transient=False),
    wrapped(EsxiError("power on VM 'x' over SSH: exit 1"), CommandError("vim-cmd", 1, "", "no")),
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("a bug"),
    EsxiError("VM 'x' still poweredOn after 30s, not poweredOff"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_transient_failures(exc: Exception) -> None:
    assert classify(exc) == "transient"


@pytest.mark.parametrize("exc", TERMINAL, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_terminal_failures(exc: Exception) -> None:
    assert classify(exc) == "terminal"


def test_delay_grows_exponentially_up_to_the_maximum_with_full_jitter() -> None:
    top = RetryPolicy(base_delay=2.0, max_delay=30.0, random=lambda: 1.0)
    assert [top.delay(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    half = RetryPolicy(base_delay=2.0, max_delay=30.0, random=lambda: 0.5)
    assert half.delay(3) == 4.0  # uniform in [0, cap]: the draw scales the whole cap
    assert RetryPolicy(random=lambda: 0.0).delay(5) == 0.0


def test_transient_failures_are_retried_until_success() -> None:
    slept: list[float] = []
    failures: list[Exception] = [ConnectionResetError("reset"), TimeoutError("slow")]

    def fn() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    policy = RetryPolicy(attempts=3, base_delay=1.0, sleep=slept.append, random=lambda: 1.0)
    result = policy.call(fn)
    assert result.ok and result.value == "done" and result.attempts == 3
    assert slept == [1.0, 2.0]


def test_transient_failures_give_up_after_the_attempts() -> None:
    slept: list[float] = []
    policy = RetryPolicy(attempts=2, sleep=slept.append, random=lambda: 0.1)

    def fn() -> None:
        raise ConnectionRefusedError("refused")

    result = policy.call(fn)
    assert not result.ok and result.attempts == 2 and result.transient
    assert isinstance(result.error, ConnectionRefusedError) and len(slept) == 1


def test_terminal_failures_are_not_retried() -> None:
    slept: list[float] = []
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise ForeignSnapshotError("not ours")

    result = RetryPolicy(attempts=5, sleep=slept.append).call(fn)
    assert result.attempts == 1 and not result.transient and calls == [1] and slept == []


def test_cancel_stops_retrying() -> None:
    cancel = threading.Event()
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        cancel.set()  # SIGTERM arrives during the first attempt
        raise ConnectionResetError("reset")

    result = RetryPolicy(attempts=5, base_delay=60.0).call(fn, cancel=cancel)
    assert result.attempts == 1 and calls == [1] and result.transient


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
