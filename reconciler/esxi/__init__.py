"""Access to standalone ESXi hosts: the vSphere API (pyvmomi, pinned TLS), SSH (paramiko, pinned host
key), snapshots, changed areas, disk reads and on-host block digests.

The backup engine uses :class:`reconciler.esxi.host.EsxiHost` (built with
:meth:`~reconciler.esxi.host.EsxiHost.from_config`) and the readers it hands out; the other modules are
its parts (parsers for .vmx, VMDK descriptors and vim-cmd output; TLS and SSH pinning; transports).
"""
