"""Shared pytest configuration: the esxisim lab fixtures (``lab``, ``lab_faults``) for lab tests."""

from __future__ import annotations

import sys
from pathlib import Path

# esxisim is not part of the installed distribution (only reconciler is): make the checkout importable
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

pytest_plugins = ["esxisim.pytest_plugin"]
