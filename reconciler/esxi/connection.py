"""What every part of a host shares: the API and SSH sessions, the host's name, the licence routing,
and the ways to the host's files that need both (a pinned HTTPS reader, the datacenter).

:class:`~reconciler.esxi.host.EsxiHost` builds one :class:`HostConnection` and hands it to its parts
(:mod:`.inventory`, :mod:`.files`, :mod:`.snapshots`, …).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from pyVmomi import vim

from reconciler.esxi.api import ApiSession, mapped_faults
from reconciler.esxi.errors import SshDisabledError
from reconciler.esxi.licence import LicenceRouting
from reconciler.esxi.shell import ShellSession
from reconciler.esxi.transport import HttpsRangeReader
from reconciler.facts.inventory import License


class HostConnection:
    """The sessions of one host and what depends on them only."""

    def __init__(
        self,
        api: ApiSession,
        shell: ShellSession | None,
        *,
        name: str,
        license: License = License.AUTO,
        api_user: str = "root",
        api_password: Callable[[], str] | None = None,
    ) -> None:
        self.api = api
        self.shell = shell
        self.name = name
        self.licence = LicenceRouting(api, shell, license, name)
        self._api_user = api_user
        self._api_password = api_password

    def faults(self, what: str) -> contextlib.AbstractContextManager[None]:
        """:func:`~reconciler.esxi.api.mapped_faults` naming this host."""
        return mapped_faults(what, self.name)

    def ssh(self) -> ShellSession:
        """The SSH session; :class:`SshDisabledError` when the config disables SSH."""
        if self.shell is None:
            raise SshDisabledError(
                f"host {self.name}: this operation needs SSH, which is disabled in the config", host=self.name
            )
        return self.shell

    def vm_mo(self, vmid: str) -> Any:
        """The API's VirtualMachine object of ``vmid`` (no round trip until a property is read)."""
        return vim.VirtualMachine(vmid, self.api.si._stub)  # type: ignore[no-untyped-call]

    def datacenter(self) -> Any:
        """The host's one datacenter (``ha-datacenter``)."""
        with self.faults("datacenter"):
            return self.api.content.rootFolder.childEntity[0]

    def datastore_mo(self, name: str) -> Any:
        """The API's Datastore object called ``name``, None when the host has none of that name (call
        it inside :meth:`ApiSession.call`)."""
        content = self.api.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Datastore], True)
        try:
            return next((d for d in view.view if d.summary.name == name), None)
        finally:
            view.Destroy()

    def refresh_api(self) -> None:
        """After a long transfer: the host may have closed the idle API connection meanwhile (ESXi and
        the lab do, after ~30 s), and the calls that follow (file tasks, registration) are not all
        retried. One idempotent round trip drops a dead connection from the pool; a session that is
        really gone is logged in again."""
        with self.faults("API session"):
            if not self.api.alive() and not self.api.alive():
                self.api.reconnect()

    def https_reader(self, streams: int) -> HttpsRangeReader:
        """A ``/folder`` reader pinned like the API, authenticated with the API session's cookie (no
        extra host session), falling back to Basic auth if the cookie is refused. The caller closes it."""
        cookie = self.api.cookie
        return HttpsRangeReader(
            self.api.address,
            self.api.port,
            self.api.ssl_context,
            user=self._api_user if self._api_password else None,
            password=self._api_password,
            cookie=cookie,
            streams=streams,
            host=self.name,
        )
