"""Connecting to a configured host: the one place an :class:`EsxiHost` is built from a config ``Host``.

It lives here, above both :mod:`reconciler.config` and :mod:`reconciler.esxi`, so the host layer never
imports the config: it is given an address, credentials, pins and the :class:`License` and
:class:`HostLimits` values of :mod:`reconciler.facts.inventory`. It is also the one module of the
operations that imports the host layer's sessions and facade (the ``host-seam`` import contract): the
others use the Protocols of :mod:`reconciler.operations.ports`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from reconciler.config.model import Host
from reconciler.esxi.api import ApiSession
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.shell import ShellSession, SshTarget
from reconciler.facts.inventory import SNAPSHOT_PREFIX

HostT = TypeVar("HostT", covariant=True)

HostFactory = Callable[[Host], HostT]
"""How operations get a host connection for a config ``Host``: :func:`connect`, or a fake in tests;
``HostT`` is the Protocol of :mod:`reconciler.operations.ports` the operation needs
(``HostFactory[HostReader]`` for observe, ``HostFactory[BackupHost]``, ``HostFactory[ApplyHost]``)."""


def connect(host: Host, *, snapshot_prefix: str = SNAPSHOT_PREFIX) -> EsxiHost:
    """An :class:`EsxiHost` for the configured ``host`` (nothing is connected until used)."""
    password = host.credentials.password.reveal
    api = ApiSession(
        host.address,
        host.api.port,
        host.credentials.user,
        password,
        host.api.thumbprint,
        insecure=host.api.insecure_skip_tls_verify,
        name=host.name,
    )
    shell = None
    if host.ssh.enabled:
        shell = ShellSession(
            SshTarget(
                address=host.address,
                port=host.ssh.port,
                user=host.ssh.user,
                host_key=host.ssh.host_key,
                insecure_skip_host_key_check=host.ssh.insecure_skip_host_key_check,
                password=password,
                private_key=host.ssh.private_key.reveal if host.ssh.private_key else None,
            )
        )
    return EsxiHost(
        api,
        shell,
        license=host.license,
        limits=host.limits,
        name=host.name,
        snapshot_prefix=snapshot_prefix,
        api_user=host.credentials.user,
        api_password=password,
    )
