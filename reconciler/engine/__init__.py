"""The engine: deciding what to do and doing it.

Two kinds of module live here and should stay apart:

* deciding, pure (no I/O, no clock, no config parsing; tested with plain values):
  ``schedule`` (when is a policy due), ``retention`` (which restore points to keep), and later ``plan``;
* doing, with I/O: observe, apply, the backup pipeline, restore.

The pure modules take ``now`` and every other input explicitly, and work on timezone-aware UTC datetimes.
"""
