"""Access to standalone ESXi hosts: the vSphere API (pyvmomi, pinned TLS), SSH (paramiko, pinned host
key), snapshots, changed areas, disk reads and on-host block digests.

The operations use :class:`reconciler.esxi.host.EsxiHost` (built from a config ``Host`` by
:func:`reconciler.operations.hosts.connect`; nothing here imports the config) and the readers it hands
out; the other modules are its parts (parsers for .vmx, VMDK descriptors and vim-cmd output; TLS and
SSH pinning; transports).
"""
