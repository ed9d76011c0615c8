"""What the reconciler knows about its own work: run history, action log, plans and per-object
conditions (:mod:`.store`, SQLite), and the rules that derive the conditions (:mod:`.conditions`).

Written by the daemon (``run``), read by ``status``, ``plan`` and ``apply``.
"""

from reconciler.status.conditions import Condition, config_condition, derive_conditions
from reconciler.status.store import StatusStore, StatusStoreError, read_history, status_path

__all__ = [
    "Condition",
    "StatusStore",
    "StatusStoreError",
    "config_condition",
    "derive_conditions",
    "read_history",
    "status_path",
]
