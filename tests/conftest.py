"""Shared pytest configuration: the esxisim lab fixtures (``lab``, ``lab_faults``) for lab tests."""

pytest_plugins = ["esxisim.pytest_plugin"]
