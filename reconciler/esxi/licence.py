"""The host's licence, and so where state-changing operations go.

Rule (:func:`license_kind_from_editions`): the host is **free** when one of
``licenseManager.licenses[].editionKey`` starts with ``esx.hypervisor`` (the "vSphere Hypervisor"
editions, e.g. ``esx.hypervisor.cpuPackageCoreLimited``), ``esx.free`` or ``esxBasic`` (ESX 4), and no
other edition is present; evaluation mode (``eval``) and every other edition count as **licensed**
(full API). A configured ``license: free|licensed`` wins over detection; ``auto`` detects once per
session (:class:`LicenceRouting`), through the API, else with ``vim-cmd vimsvc/license --show``.

Changes (snapshots, power, registration, CBT) go through the API on a licensed host; when it answers
``RestrictedVersion`` anyway, they go over SSH (if enabled) for the rest of the session.
"""

from __future__ import annotations

import logging

from reconciler.esxi import vimcmd
from reconciler.esxi.api import ApiSession
from reconciler.esxi.errors import ApiError, HostConnectionError, RestrictedByLicenseError
from reconciler.esxi.shell import ShellSession
from reconciler.facts.inventory import License

log = logging.getLogger(__name__)

_LICENSES_SEEN: dict[str, str] = {}
"""The licence last logged per host name: the daemon connects anew every cycle and logs only changes."""

FREE_EDITION_PREFIXES = ("esx.hypervisor", "esx.free", "esxbasic")


def license_kind_from_editions(editions: list[str]) -> str:
    """``free`` or ``licensed`` from the edition keys (rule in the module doc). No key → ``licensed``
    (the API will tell with RestrictedVersion)."""
    keys = [e for e in editions if e]
    if keys and all(k.lower().startswith(FREE_EDITION_PREFIXES) for k in keys):
        return "free"
    return "licensed"


class LicenceRouting:
    """The licence of one host (configured or detected once) and whether changes go through the API."""

    def __init__(self, api: ApiSession, shell: ShellSession | None, configured: License, name: str) -> None:
        self._api = api
        self._shell = shell
        self._name = name
        self._kind: str | None = None if configured == License.AUTO else configured.value
        self.api_restricted = False
        """The API refused a change although the host counts as licensed: SSH from now on."""

    @property
    def kind(self) -> str:
        """``free`` or ``licensed``: as configured, or detected once."""
        if self._kind is None:
            try:
                editions = self._api.license_editions()
            except (ApiError, HostConnectionError):
                if self._shell is None:
                    raise
                text = self._shell.run(vimcmd.license_show(), timeout=60).text
                editions = vimcmd.parse_license_editions(text)
            self._kind = license_kind_from_editions(editions)
            # every cycle connects anew: log a change of licence, not each detection
            level = logging.DEBUG if _LICENSES_SEEN.get(self._name) == self._kind else logging.INFO
            _LICENSES_SEEN[self._name] = self._kind
            log.log(level, "host %s: licence detected as %s (editions %s)", self._name, self._kind, editions)
        return self._kind

    def use_api_for_changes(self) -> bool:
        return self.kind == "licensed" and not self.api_restricted

    def api_refused(self, exc: RestrictedByLicenseError) -> None:
        """The API refused a change with RestrictedVersion: go over SSH from now on, or raise ``exc``
        when SSH is disabled."""
        if self._shell is None:
            raise exc
        if not self.api_restricted:
            log.warning("host %s refuses API changes (licence); using vim-cmd over SSH", self._name)
        self.api_restricted = True
