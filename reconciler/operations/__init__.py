"""Operations: doing, with I/O on hosts, repositories and the local machine.

Observe, apply a plan, back up, prune, restore, export, hooks, retries, per-VM locks, progress. The
decisions they act on come from :mod:`reconciler.rules` and :mod:`reconciler.planning`. Nothing is
imported here, so importing one operation does not load the others.
"""
