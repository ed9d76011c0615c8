"""esxi-reconciler: agentless, GitOps-style backup for VMware ESXi virtual machines."""

__version__ = "0.1.0"
