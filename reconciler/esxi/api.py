"""The vSphere API (pyvmomi) of one standalone host: pinned connection, session reuse and the
translation of what pyVmomi raises into :mod:`.errors` (:func:`mapped_faults`).

Whatever the licence (:mod:`.licence`), a ``vim.fault.RestrictedVersion`` is mapped to
:class:`RestrictedByLicenseError` so callers can fall back to SSH.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from reconciler.esxi.errors import (
    ApiAuthError,
    ApiError,
    EsxiError,
    HostConnectionError,
    RestrictedByLicenseError,
    TaskTimeoutError,
    transient_os_error,
)
from reconciler.esxi.tls import pinned_context

log = logging.getLogger(__name__)
T = TypeVar("T")

_AUTH_FAULTS = (vim.fault.InvalidLogin, vim.fault.NoPermission, vim.fault.NotAuthenticated)
"""Faults that say who we are is refused: terminal (a session that expired is logged in again by
:meth:`ApiSession.call` first)."""
_BUSY_FAULTS = (vmodl.fault.HostCommunication, vim.fault.TaskInProgress, vim.fault.Timedout)
"""Faults that say the host is busy or did not answer in time: transient. ``HostCommunication`` covers
``HostNotConnected`` and ``HostNotReachable``."""


@contextlib.contextmanager
def mapped_faults(what: str, host: str | None = None) -> Iterator[None]:
    """The boundary to pyVmomi: what the block raises leaves as an :class:`EsxiError` (the original is
    the ``__cause__``): RestrictedVersion → :class:`RestrictedByLicenseError`; a refused login or
    permission → :class:`ApiAuthError`; other vim/vmodl faults → :class:`ApiError` (transient when the
    host was busy or unreachable); a network failure (``OSError``, ``http.client`` errors, EOF) →
    :class:`HostConnectionError`. Our own errors pass unchanged but for ``host``: given, it names
    the host on every error leaving the block (so the outermost block's name wins: the config name
    :class:`~reconciler.esxi.host.EsxiHost` gives over the address an inner one knows)."""
    try:
        yield
    except EsxiError as exc:
        if host is not None:
            exc.host = host
        raise
    except vim.fault.RestrictedVersion as exc:
        msg = getattr(exc, "msg", "") or "RestrictedVersion"
        raise RestrictedByLicenseError(f"{what}: refused by the host's licence ({msg})", host=host) from exc
    except _AUTH_FAULTS as exc:
        raise ApiAuthError(f"{what}: {_fault_text(exc)}", host=host) from exc
    except vmodl.MethodFault as exc:
        raise ApiError(
            f"{what}: {_fault_text(exc)}", host=host, transient=isinstance(exc, _BUSY_FAULTS)
        ) from exc
    except (OSError, http.client.HTTPException, EOFError) as exc:
        raise HostConnectionError(
            f"{what}: {type(exc).__name__}: {exc}", host=host, transient=transient_os_error(exc)
        ) from exc


def _fault_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'msg', '') or exc}"


def wait_task(task: Any, timeout: float, what: str) -> Any:
    """Wait for a vim.Task (at most ``timeout`` s) and return its result; faults are mapped.

    Polls ``task.info`` (0.1 s growing to 1 s) rather than pyVim's WaitForTask, whose ``maxWaitTime``
    is only checked when the task reports progress. Raises :class:`TaskTimeoutError` (the task may
    still be running) when the time is up."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    with mapped_faults(what):
        while True:
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                raise info.error
            if time.monotonic() > deadline:
                raise TaskTimeoutError(f"{what}: task still {info.state} after {timeout} s", task)
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


class ApiSession:
    """One logged-in pyvmomi session, reused across calls and re-established when it expires or the
    connection dropped. Thread-safe for connect/reconnect; pyvmomi calls themselves may run from
    several threads (its stub uses a connection pool)."""

    def __init__(
        self,
        address: str,
        port: int,
        user: str,
        password: Callable[[], str],
        thumbprint: str | None,
        *,
        insecure: bool = False,
        timeout: float = 60.0,
        name: str | None = None,
    ) -> None:
        self.name = name or address
        """The host's configured name, for messages (the address when none is given)."""
        self.address = address
        self.port = port
        self.user = user
        self._password = password
        self.thumbprint = thumbprint
        self.insecure = insecure
        self.timeout = timeout
        self._si: Any = None
        self._lock = threading.Lock()
        self.ssl_context: Any = None

    def _connect(self) -> Any:
        with mapped_faults(f"login to {self.address}:{self.port}", self.name):
            ctx = pinned_context(self.address, self.port, self.thumbprint, insecure=self.insecure)
            si = SmartConnect(  # type: ignore[no-untyped-call]
                host=self.address,
                port=self.port,
                user=self.user,
                pwd=self._password(),
                sslContext=ctx,
                disableSslCertValidation=False,
                httpConnectionTimeout=self.timeout,
            )
        self.ssl_context = ctx
        return si

    @property
    def si(self) -> Any:
        """The ServiceInstance, connecting on first use."""
        with self._lock:
            if self._si is None:
                self._si = self._connect()
            return self._si

    @property
    def content(self) -> Any:
        with mapped_faults("service content", self.name):
            return self.si.RetrieveContent()

    def alive(self) -> bool:
        """Whether the session is still logged in (one cheap round trip)."""
        if self._si is None:
            return False
        try:
            return self._si.content.sessionManager.currentSession is not None
        except (vmodl.MethodFault, OSError, http.client.HTTPException):
            return False

    def reconnect(self) -> None:
        """Drop the session and log in again."""
        with self._lock:
            old, self._si = self._si, None
        if old is not None:
            with contextlib.suppress(Exception):
                Disconnect(old)  # type: ignore[no-untyped-call]
        _ = self.si

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with mapped faults; on an expired session log in again, on a dropped connection
        (e.g. one the host closed while idle) reconnect; then retry once (only for idempotent calls)."""
        try:
            with mapped_faults(what, self.name):
                return fn()
        except (ApiAuthError, HostConnectionError) as exc:
            expired = isinstance(exc.__cause__, vim.fault.NotAuthenticated)
            if not expired and not isinstance(exc, HostConnectionError):
                raise
            reason = type(exc.__cause__).__name__
            if expired or not self.alive():
                log.info(
                    "API session to host %s (%s) lost (%s); logging in again", self.name, self.address, reason
                )
                self.reconnect()
            else:
                # The session is fine but the pooled connection was dropped (hosts close idle
                # connections): a fresh connection carries the retry.
                log.info(
                    "API connection to host %s (%s) dropped (%s); retrying", self.name, self.address, reason
                )
            with mapped_faults(what, self.name):
                return fn()

    @property
    def cookie(self) -> str | None:
        """The session cookie (``vmware_soap_session=…``, attributes stripped) for /folder requests."""
        cookie = getattr(self.si._stub, "cookie", None)
        return str(cookie).split(";", 1)[0].strip() if cookie else None

    def license_editions(self) -> list[str]:
        """Edition keys of the host's licences (a read: works on free hosts)."""
        return self.call(
            "licenses", lambda: [str(lic.editionKey) for lic in self.content.licenseManager.licenses or []]
        )

    def close(self) -> None:
        with self._lock:
            si, self._si = self._si, None
        if si is not None:
            with contextlib.suppress(Exception):
                Disconnect(si)  # type: ignore[no-untyped-call]
