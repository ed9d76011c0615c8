"""What the reconciler knows about its own work: run history, action log, plans and per-object
conditions (:mod:`.store`, SQLite), and the rules that derive the conditions (:mod:`.conditions`, pure).

Written by the daemon (``run``), read by ``status``, ``plan`` and ``apply``. Nothing is imported here,
so importing the pure :mod:`.conditions` does not open SQLite.
"""
