"""The verbs of ``esxi-reconciler``, one module each; every module has ``register(commands)``.

:mod:`reconciler.cli` lists them in help order (``COMMANDS``) and builds the parser; :mod:`.common`
holds the global options and the helpers every verb shares.
"""
