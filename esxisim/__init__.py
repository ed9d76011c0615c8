"""esxisim: a lab of simulated VMware ESXi hosts for the integration tests, the demo and benchmarks.

Each simulated host is a Go process built on govmomi's ``vcsim`` (the vSphere SOAP API over HTTPS, a
control API on a unix socket) plus a real OpenSSH ``sshd`` chrooted into a private mount namespace
whose ``/vmfs/volumes/<datastore>`` are the host's datastore directories. ``docs/lab.md`` is the spec.

This package is not shipped in the wheel.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
"""The ``esxisim`` package directory (``helpers`` in sim.json)."""

REPO_DIR = PACKAGE_DIR.parent
"""The checkout holding the package (put on PYTHONPATH for helper processes)."""

TOOLS_DIR = PACKAGE_DIR / "tools"
"""vim-cmd, vmkfstools and python: bind-mounted at /opt/esxisim/bin in each host's SSH shell."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
