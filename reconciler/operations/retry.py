"""Retrying an action within one ``apply``: which failures are worth another try, and how long to wait.

A *transient* failure is one the same call may not hit again in a minute: a connection lost, refused or
reset, a timeout, a host that does not answer, an SSH transport failure that is not a command's exit
status, the repository locked by another process. Everything else is *terminal* — the host or the
config said no (a foreign snapshot, no space, the licence, a command that exited non-zero, bad
credentials, a broken secret) — and retrying it would only hammer the host. Unknown exceptions are
terminal too: a bug does not get better by repetition.

Backoff between daemon loops is not done here: the status store holds a failed job back
(``RunRecord.retry_after``) using :attr:`reconciler.planning.actions.Outcome.transient`.
"""

from __future__ import annotations

import errno
import http.client
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import structlog

from reconciler.config.errors import ConfigError
from reconciler.config.secrets import SecretError
from reconciler.esxi.errors import (
    ApiError,
    CommandError,
    ForeignSnapshotError,
    InsufficientSpaceError,
    NotPinnedError,
    PinMismatchError,
    RestrictedByLicenseError,
    ShellAuthError,
    ShellError,
    SnapshotTimeoutError,
    TaskTimeoutError,
)
from reconciler.operations.vmlock import VmBusyError
from reconciler.repository.errors import LockedError, StorageError, WrongKeyError

log = structlog.get_logger(__name__)

T = TypeVar("T")
Kind = Literal["transient", "terminal"]

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


def _auth_fault(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in {"InvalidLogin", "NoPermission", "NotAuthenticated", "AuthenticationException"}


def classify(exc: BaseException) -> Kind:
    """Whether ``exc`` is worth retrying (``transient``) or not (``terminal``); see the module doc."""
    if isinstance(
        exc,
        ForeignSnapshotError
        | InsufficientSpaceError
        | RestrictedByLicenseError
        | CommandError
        | NotPinnedError
        | PinMismatchError
        | ConfigError
        | SecretError
        | WrongKeyError,
    ):
        return "terminal"
    if isinstance(exc, LockedError | VmBusyError | TaskTimeoutError | SnapshotTimeoutError | TimeoutError):
        return "transient"
    if _auth_fault(exc):
        return "terminal"
    if isinstance(exc, ShellAuthError):
        return "terminal"
    if isinstance(exc, ShellError):
        if exc.__cause__ is not None and _auth_fault(exc.__cause__):
            return "terminal"
        return "transient"  # no exit status: the connection or transport failed
    if isinstance(exc, ApiError):
        cause = exc.__cause__
        if cause is not None and _auth_fault(cause):
            return "terminal"
        if isinstance(cause, OSError | http.client.HTTPException | TimeoutError):
            return classify(cause) if isinstance(cause, OSError) else "transient"
        if cause is not None and type(cause).__name__ in {
            "HostCommunication",
            "HostNotConnected",
            "HostConnectFault",  # an HTTP 5xx at login: hostd restarting behind the proxy
        }:
            return "transient"
        return "terminal"
    if isinstance(exc, StorageError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # a full volume is fixed by freeing space (the admin, a GC): the daemon tries again within
        # minutes rather than after the 6 hours of a terminal failure
        return "transient"
    if isinstance(exc, ConnectionError | http.client.HTTPException):
        return "transient"
    if isinstance(exc, OSError):
        return "transient" if exc.errno in _TRANSIENT_ERRNOS else "terminal"
    cause = exc.__cause__
    if cause is not None and cause is not exc:
        return classify(cause)  # e.g. EsxiError("... over SSH: ...") wrapping the real failure
    if type(exc).__module__.startswith("urllib3") and "Error" in type(exc).__name__:
        return "transient"  # connection pool / protocol errors of HTTPS disk reads
    return "terminal"


def is_transient(exc: BaseException) -> bool:
    return classify(exc) == "transient"


@dataclass
class Attempted(Generic[T]):
    """The end of :meth:`RetryPolicy.call`: the value, or the last error and whether it was transient."""

    value: T | None
    error: BaseException | None
    attempts: int
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS style: a delay drawn from ``[0, min(max, base·2ⁿ)]``),
    so many VMs failing together do not retry in lockstep. ``sleep`` and ``random`` are test seams; by
    default the wait ends early when the apply is cancelled."""

    attempts: int = 3
    base_delay: float = 5.0
    max_delay: float = 120.0
    sleep: Callable[[float], None] | None = field(default=None, compare=False)
    random: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1, 2, ...)."""
        cap = min(self.max_delay, self.base_delay * (2 ** max(0, failures - 1)))
        return float(cap * self.random())

    def wait(self, failures: int, cancel: threading.Event | None) -> None:
        seconds = self.delay(failures)
        if self.sleep is not None:
            self.sleep(seconds)
        elif cancel is not None:
            cancel.wait(seconds)
        else:
            threading.Event().wait(seconds)

    def call(
        self,
        fn: Callable[[], T],
        *,
        cancel: threading.Event | None = None,
        what: str = "",
        attempts: int | None = None,
    ) -> Attempted[T]:
        """Run ``fn`` until it succeeds, fails terminally, is cancelled, or ``attempts`` (default:
        the policy's) are used up; never raises an :class:`Exception` (it is in the result)."""
        limit = attempts or self.attempts
        tries = 0
        while True:
            tries += 1
            try:
                return Attempted(fn(), None, tries)
            except Exception as exc:
                transient = is_transient(exc)
                cancelled = cancel is not None and cancel.is_set()
                if not transient or tries >= limit or cancelled:
                    return Attempted(None, exc, tries, transient)
                log.warning("apply.retry", what=what, attempt=tries, error=str(exc))
                self.wait(tries, cancel)
                if cancel is not None and cancel.is_set():
                    return Attempted(None, exc, tries, transient)
