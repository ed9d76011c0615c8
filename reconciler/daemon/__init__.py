"""The daemon (``esxi-reconciler run``): the loop (:mod:`.loop`), one reconcile cycle (:mod:`.cycle`),
config watching with debounce (:mod:`.watch`), systemd notifications (:mod:`.notify`), signals
(:mod:`.signals`) and the single-instance lock (:mod:`.lock`)."""

from reconciler.daemon.cycle import Cycle, CycleContext, CycleResult, reconcile
from reconciler.daemon.lock import AlreadyRunning, InstanceLock
from reconciler.daemon.loop import Daemon
from reconciler.daemon.notify import Notifier

__all__ = [
    "AlreadyRunning",
    "Cycle",
    "CycleContext",
    "CycleResult",
    "Daemon",
    "InstanceLock",
    "Notifier",
    "reconcile",
]
