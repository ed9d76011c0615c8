"""Clients for a running lab, pinned the way the product must pin: pyvmomi to the TLS thumbprint,
paramiko to the host key. Used by the pytest fixtures, the demo and the benchmarks alike."""

from __future__ import annotations

import contextlib
import re
import shlex
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim
from pyVmomi.Security import VerifyCertThumbprint

from esxisim import MiB
from esxisim.client import ControlClient
from esxisim.lab import Lab
from esxisim.record import ShellRecording, recording

FREE_HOST = "esxi1"
LICENSED_HOST = "esxi2"
TEST_DISK_SIZES = (32 * MiB, 16 * MiB)


@dataclass(frozen=True)
class SshResult:
    exit: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")


def pinned_context(host: str, port: int, thumbprint: str) -> ssl.SSLContext:
    """An SSL context that accepts only the certificate whose SHA-1/SHA-256 thumbprint is given.

    Raises ``pyVmomi.Security.ThumbprintMismatchException`` if the server shows another certificate.
    """
    pem = ssl.get_server_certificate((host, port))
    der = ssl.PEM_cert_to_DER_cert(pem)
    VerifyCertThumbprint(der, thumbprint.replace(":", "").lower())  # type: ignore[no-untyped-call]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # ESXi certificates name the host's install-time hostname
    ctx.load_verify_locations(cadata=pem)
    return ctx


def find_vm(si: Any, name: str) -> Any:
    """The vim.VirtualMachine called ``name`` (through a container view, as the product lists VMs)."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            if vm.name == name:
                return vm
    finally:
        view.Destroy()
    raise KeyError(f"no VM {name!r}")


def wait_task(task: Any, timeout: float = 120.0) -> Any:
    """Wait for a vim.Task and return its result (its fault is raised)."""
    WaitForTask(task, maxWaitTime=timeout)  # type: ignore[no-untyped-call]
    return task.info.result


def snapshot_ids(text: str) -> dict[str, str]:
    """Snapshot name → id from ``vim-cmd vmsvc/snapshot.get`` output."""
    names = re.findall(r"^-*Snapshot Name\s*: (.*)$", text, re.MULTILINE)
    ids = re.findall(r"^-*Snapshot Id\s*: (\d+)$", text, re.MULTILINE)
    if len(names) != len(ids):
        raise ValueError(f"cannot parse snapshot.get output:\n{text}")
    return dict(zip(names, ids, strict=True))


def vmfs_path(ds_path: str) -> str:
    """``[datastore1] web01/web01.vmdk`` → ``/vmfs/volumes/datastore1/web01/web01.vmdk``."""
    if not ds_path.startswith("["):
        return ds_path
    ds, _, rel = ds_path[1:].partition("]")
    return f"/vmfs/volumes/{ds}/{rel.strip()}"


class LabHandle:
    """What a test needs from the running lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.info: dict[str, Any] = lab.info
        self._ssh: dict[str, paramiko.SSHClient] = {}
        self._si: list[Any] = []

    free = FREE_HOST
    licensed = LICENSED_HOST

    def host(self, name: str) -> dict[str, Any]:
        return self.lab.host_info(name)

    def vm(self, host: str, name: str) -> dict[str, Any]:
        for vm in self.host(host)["vms"]:
            if vm["name"] == name:
                return dict(vm)
        raise KeyError(f"no VM {name!r} on {host}")

    def local_path(self, host: str, ds_path: str) -> Path:
        """The real path (outside the host's namespace) of ``[ds] rel`` on ``host``."""
        ds, _, rel = ds_path[1:].partition("]")
        for d in self.host(host)["datastores"]:
            if d["name"] == ds:
                return Path(d["path"]) / rel.strip()
        raise KeyError(f"no datastore {ds!r} on {host}")

    def password(self, host: str) -> str:
        return self.lab.host(host).password

    def client(self, host: str) -> ControlClient:
        return self.lab.client(host)

    def fault(self, host: str, kind: str, **options: Any) -> dict[str, Any]:
        return self.lab.fault(host, kind, **options)

    def recording(self, host: str) -> contextlib.AbstractContextManager[ShellRecording]:
        """Record every SSH command line ``host`` receives and the argv of the programs it runs, for
        the duration of a ``with`` block (esxisim/record.py)."""
        return recording(self.lab.host(host).dir)

    def clear_faults(self) -> None:
        for name in self.lab.hosts:
            self.lab.fault(name, "clear")

    # -- vSphere API

    def connect_api(self, host: str, thumbprint: str | None = None) -> Any:
        """A new pyvmomi ServiceInstance pinned to ``thumbprint`` (default: the host's SHA-256 one).

        pyvmomi's own ``thumbprint=`` is not enough: it is only checked when normal certificate
        verification fails, and SmartConnect switches verification off by itself for 127.0.0.1 (and
        its version probe does not pin at all). So the certificate is fetched and checked against the
        thumbprint first, and then made the only trust anchor of the SSL context, so that every
        connection of the session is verified against exactly that certificate.
        """
        api = self.host(host)["api"]
        pin = thumbprint or api["thumbprint_sha256"]
        ctx = pinned_context(api["host"], api["port"], pin)
        return SmartConnect(  # type: ignore[no-untyped-call]
            host=api["host"], port=api["port"], user="root", pwd=self.password(host), sslContext=ctx
        )

    @staticmethod
    def disconnect(si: Any) -> None:
        Disconnect(si)  # type: ignore[no-untyped-call]

    def api(self, host: str) -> Any:
        """A pinned ServiceInstance, disconnected at the end of the session."""
        si = self.connect_api(host)
        self._si.append(si)
        return si

    # -- SSH

    def connect_ssh(self, host: str, *, password: bool = False, timeout: float = 15.0) -> paramiko.SSHClient:
        """A new paramiko client pinned to the host key, logged in with the client key or the password."""
        ssh = self.host(host)["ssh"]
        client = paramiko.SSHClient()
        client.load_host_keys(ssh["known_hosts"])
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        kwargs: dict[str, Any] = (
            {"password": self.password(host)} if password else {"key_filename": ssh["private_key"]}
        )
        client.connect(
            ssh["host"],
            port=ssh["port"],
            username=ssh["user"],
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            **kwargs,
        )
        return client

    def ssh(self, host: str) -> paramiko.SSHClient:
        """A cached pinned SSH client (reconnected if its transport died)."""
        client = self._ssh.get(host)
        transport = client.get_transport() if client is not None else None
        if client is None or transport is None or not transport.is_active():
            if client is not None:
                client.close()
            client = self.connect_ssh(host)
            self._ssh[host] = client
        return client

    def run(self, host: str, command: str, timeout: float = 120.0) -> SshResult:
        """Run a shell command on the host over SSH (reconnecting once if the cached session died)."""
        try:
            _, out, err = self.ssh(host).exec_command(command, timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError):
            transport = self._ssh[host].get_transport()
            if transport is not None and transport.is_active():
                # a dropped session can raise here before paramiko's transport thread has marked it
                # inactive: give that thread time to end before taking the error for the command's
                transport.join(5.0)
            if transport is not None and transport.is_active():
                raise
            self._ssh.pop(host).close()
            _, out, err = self.ssh(host).exec_command(command, timeout=timeout)
        stdout = out.read()
        stderr = err.read()
        return SshResult(out.channel.recv_exit_status(), stdout, stderr)

    def vimcmd(self, host: str, *args: str) -> SshResult:
        """``vim-cmd ARGS`` over SSH (arguments shell-quoted)."""
        return self.run(host, "vim-cmd " + " ".join(shlex.quote(a) for a in args))

    def close(self) -> None:
        for client in self._ssh.values():
            client.close()
        self._ssh.clear()
        for si in self._si:
            with contextlib.suppress(Exception):
                Disconnect(si)  # type: ignore[no-untyped-call]
        self._si.clear()
