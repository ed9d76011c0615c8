"""Quantities for people, shared by every layer (the CLI's output, the repository's error messages)."""

from __future__ import annotations


def human_size(n: int) -> str:
    """Bytes in binary units for people: ``"512 B"``, ``"1.5 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover
