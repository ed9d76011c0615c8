"""Rules: the pure decisions that stand on their own — when a schedule is due, which restore points
retention keeps, and how durations read.

Standard library only, no I/O and no clock: every function takes ``now`` and its other inputs
explicitly and works on timezone-aware UTC datetimes. The config model holds these very types, so this
package sits below :mod:`reconciler.config` and imports nothing of ours. Nothing is imported here, so
importing one module does not load the others.
"""
