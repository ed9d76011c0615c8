"""Power and registration of a host's VMs: the API on a licensed host, ``vim-cmd`` over SSH on a free
one (or when the API refuses: :mod:`.licence`). Every change waits until the host reports the new
state."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyVmomi import vim

from reconciler.esxi import vimcmd
from reconciler.esxi.api import wait_task
from reconciler.esxi.connection import HostConnection
from reconciler.esxi.errors import CommandError, EsxiError, PowerStateTimeoutError, RestrictedByLicenseError
from reconciler.esxi.inventory import Inventory, vmid_of
from reconciler.esxi.transport import vmfs_path
from reconciler.facts.inventory import VmInfo


class Power:
    """Power state and registration of one host's VMs."""

    def __init__(self, conn: HostConnection, inventory: Inventory) -> None:
        self.conn = conn
        self.inventory = inventory

    def _vm_change(
        self,
        what: str,
        api_call: Callable[[], Any],
        argv: list[str],
        timeout: float,
        check_output: Callable[[str], None] | None = None,
    ) -> str:
        """Run one state-changing VM operation: ``api_call()`` (a task or a plain call) on a licensed
        host, else ``argv`` over SSH; returns the SSH output ("" through the API). ``check_output``
        judges stdout and stderr together (vim-cmd can report a failure with exit status 0; ESXi 6.x
        print a bare ``Power on failed`` on stderr)."""
        if self.conn.licence.use_api_for_changes():
            try:
                with self.conn.faults(what):  # not api.call: retrying a power or register call is unsafe
                    result = api_call()
                if isinstance(result, vim.Task):
                    wait_task(result, timeout, what)
                return ""
            except RestrictedByLicenseError as exc:
                self.conn.licence.api_refused(exc)
        try:
            res = self.conn.ssh().run(argv, timeout=timeout, retry=False)
            if check_output is not None:
                check_output("\n".join(part for part in (res.text, res.error_text) if part))
            return res.text
        except CommandError as exc:
            raise EsxiError(f"{what} over SSH: {exc}") from exc

    def wait_power_state(self, vm: VmInfo | str, state: str, *, timeout: float = 300.0) -> VmInfo:
        """Poll until the VM reports ``state`` (``poweredOn``/``poweredOff``/``suspended``)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.inventory.vm(vmid_of(vm))
            if info.power_state == state:
                return info
            if time.monotonic() > deadline:
                raise PowerStateTimeoutError(
                    f"VM {info.name!r} still {info.power_state} after {timeout:.0f}s, not {state}"
                )
            time.sleep(0.5)

    def power_on(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Power the VM on and wait until the host reports it on (no-op when it already is)."""
        info = self.inventory.vm(vmid_of(vm))
        if info.power_state != "poweredOn":
            self._vm_change(
                f"power on VM {info.name!r}",
                lambda: self.conn.vm_mo(info.vmid).PowerOnVM_Task(),
                vimcmd.power(info.vmid, "on"),
                timeout,
                lambda text: vimcmd.check_power_output("on", text),
            )
        return self.wait_power_state(info, "poweredOn", timeout=timeout)

    def power_off(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Hard power-off (like pulling the plug); prefer :meth:`shutdown_guest`."""
        info = self.inventory.vm(vmid_of(vm))
        if info.power_state != "poweredOff":
            self._vm_change(
                f"power off VM {info.name!r}",
                lambda: self.conn.vm_mo(info.vmid).PowerOffVM_Task(),
                vimcmd.power(info.vmid, "off"),
                timeout,
                lambda text: vimcmd.check_power_output("off", text),
            )
        return self.wait_power_state(info, "poweredOff", timeout=timeout)

    def shutdown_guest(self, vm: VmInfo | str, *, timeout: float = 600.0) -> VmInfo:
        """Ask the guest OS to shut down (VMware Tools) and wait up to ``timeout`` for power-off;
        raises :class:`PowerStateTimeoutError` when it does not stop in time (the VM is left running)."""
        info = self.inventory.vm(vmid_of(vm))
        if info.power_state == "poweredOff":
            return info
        self._vm_change(
            f"guest shutdown of VM {info.name!r}",
            lambda: self.conn.vm_mo(info.vmid).ShutdownGuest(),
            vimcmd.power(info.vmid, "shutdown"),
            min(timeout, 120.0),
            lambda text: vimcmd.check_power_output("shutdown", text),
        )
        return self.wait_power_state(info, "poweredOff", timeout=timeout)

    def guest_heartbeat(self, vm: VmInfo | str) -> str:
        """The guest heartbeat colour the host reports: ``green`` (Tools answering), ``yellow``, ``red``,
        ``gray`` (no Tools / not running)."""
        mo = self.conn.vm_mo(vmid_of(vm))
        return str(self.conn.api.call("guest heartbeat", lambda: mo.summary.quickStats.guestHeartbeatStatus))

    def register_vm(self, vmx_path: str, *, timeout: float = 300.0) -> VmInfo:
        """Register the VM whose ``.vmx`` is at datastore path ``vmx_path`` (``[ds] dir/x.vmx``) and
        return it; its display name is the one in the .vmx."""
        before = {v.vmid for v in self.inventory.list_vms()}

        def api() -> Any:
            content = self.conn.api.si.RetrieveContent()
            datacenter = content.rootFolder.childEntity[0]
            pool = content.rootFolder.childEntity[0].hostFolder.childEntity[0].resourcePool
            return datacenter.vmFolder.RegisterVM_Task(path=vmx_path, asTemplate=False, pool=pool)

        self._vm_change(f"register {vmx_path}", api, vimcmd.registervm(vmfs_path(vmx_path)), timeout)
        found = [v for v in self.inventory.list_vms() if v.vmid not in before and v.vmx_path == vmx_path]
        if len(found) != 1:
            raise EsxiError(f"registered {vmx_path} but found {len(found)} new VMs with that .vmx")
        return found[0]

    def unregister_vm(self, vm: VmInfo | str, *, timeout: float = 300.0) -> None:
        """Remove the VM from the inventory, keeping its files (it must be powered off)."""
        info = self.inventory.vm(vmid_of(vm))
        self._vm_change(
            f"unregister VM {info.name!r}",
            lambda: self.conn.vm_mo(info.vmid).UnregisterVM(),
            vimcmd.unregister(info.vmid),
            timeout,
        )

    def reload_vm(self, vm: VmInfo | str, *, timeout: float = 300.0) -> VmInfo:
        """Make the host re-read the VM's .vmx after an edit (VM powered off) and return the VM:
        ``vim-cmd vmsvc/reload`` over SSH; without SSH the VM is unregistered and registered again from
        the same .vmx (the API's ``Reload`` refreshes only hostd's view and the lab does not implement
        ``ReloadVirtualMachineFromPath``), which keeps its identity (the .vmx holds the UUIDs) but gives
        it a new vmid."""
        info = self.inventory.vm(vmid_of(vm))
        if self.conn.shell is not None:
            self.conn.ssh().run(vimcmd.reload(info.vmid), timeout=timeout, retry=False)
            return self.inventory.vm(info.vmid)
        if info.power_state != "poweredOff":
            raise EsxiError(f"VM {info.name!r} must be powered off to reload its .vmx")
        self.unregister_vm(info, timeout=timeout)
        return self.register_vm(info.vmx_path, timeout=timeout)
