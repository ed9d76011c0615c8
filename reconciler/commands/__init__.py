"""The verbs of ``esxi-reconciler``, one module each; every module has ``register(commands)``.

:mod:`reconciler.cli` lists them in help order (``COMMANDS``) and owns the shared options and helpers.
"""
