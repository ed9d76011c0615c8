"""Facts: plain value types shared by the I/O packages and the planner, standard library only.

:mod:`.inventory` is what a host holds (VMs, disks, snapshots, datastores) and the host settings the
host layer is given; :mod:`.points` is what a repository holds (restore point records). The host layer
(:mod:`reconciler.esxi`) and the repository (:mod:`reconciler.repository`) produce them, the planner
reads them, and neither side needs to import the other. Nothing is imported here.
"""
