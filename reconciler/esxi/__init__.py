"""Access to standalone ESXi hosts: the vSphere API (pyvmomi, pinned TLS), SSH (paramiko, pinned host
key), snapshots, changed areas, disk reads and on-host block digests.

The operations use :class:`reconciler.esxi.host.EsxiHost` (built from a config ``Host`` by
:func:`reconciler.operations.hosts.connect`; nothing here imports the config), through the Protocols of
:mod:`reconciler.operations.ports`, and the readers it hands out. ``EsxiHost`` is a facade over one
module per concern (inventory, datastores, files, disks, snapshots, cbt, power, licence, signals)
sharing a :class:`~reconciler.esxi.connection.HostConnection`; the other modules are the sessions
(API, TLS, SSH), the transports and the parsers (.vmx, VMDK descriptors, vim-cmd and esxcli output).
Everything raised here is an :class:`~reconciler.esxi.errors.EsxiError` saying whether a retry may
help and naming the host.
"""
