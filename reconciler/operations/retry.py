"""Retrying an action within one ``apply``: which failures are worth another try, and how long to wait.

A *transient* failure is one the same call may not hit again in a minute: a connection lost, refused or
reset, a timeout, a host that does not answer or is busy, the repository or the VM locked by another
process. Everything else is *terminal* — the host or the config said no (a foreign snapshot, no space,
the licence, a command that failed, bad credentials, a pin mismatch, a broken secret) — and retrying it
would only hammer the host. Unknown exceptions are terminal too: a bug does not get better by
repetition.

The failures say it themselves: :attr:`reconciler.esxi.errors.EsxiError.transient` (the host layer
translates what its libraries raise and decides there), :attr:`RepositoryError.transient
<reconciler.repository.errors.RepositoryError.transient>`; for the standard library's network errors
:func:`~reconciler.esxi.errors.transient_os_error`. Nothing here looks at class names or at which
library raised.

Backoff between daemon loops is not done here: the status store holds a failed job back
(``RunRecord.retry_after``) using :attr:`reconciler.planning.actions.Outcome.transient`.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import structlog

from reconciler.config.errors import ConfigError
from reconciler.config.secrets import SecretError
from reconciler.esxi.errors import EsxiError, transient_os_error
from reconciler.operations.vmlock import VmBusyError
from reconciler.repository.errors import RepositoryError

log = structlog.get_logger(__name__)

T = TypeVar("T")
Kind = Literal["transient", "terminal"]


def classify(exc: BaseException) -> Kind:
    """Whether ``exc`` is worth retrying (``transient``) or not (``terminal``); see the module doc."""
    if isinstance(exc, EsxiError | RepositoryError):
        transient = exc.transient
    elif isinstance(exc, VmBusyError):
        transient = True
    elif isinstance(exc, ConfigError | SecretError):
        transient = False
    elif isinstance(exc, OSError | EOFError | http.client.HTTPException) or exc.__cause__ in (None, exc):
        transient = transient_os_error(exc)  # the standard library's network errors; others: False
    else:
        return classify(exc.__cause__)  # a wrapper of ours (e.g. a restore's error) is as its cause
    return "transient" if transient else "terminal"


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
            except Exception as exc:  # noqa: BLE001  every failure reaches is_transient; a permanent one is returned at once, not retried
                transient = is_transient(exc)
                cancelled = cancel is not None and cancel.is_set()
                if not transient or tries >= limit or cancelled:
                    return Attempted(None, exc, tries, transient)
                log.warning("apply.retry", what=what, attempt=tries, error=str(exc))
                self.wait(tries, cancel)
                if cancel is not None and cancel.is_set():
                    return Attempted(None, exc, tries, transient)
