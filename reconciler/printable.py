"""One rule for showing text from outside (VM, snapshot and file names) to a person.

Names come from host inventories and the repository and may hold any character: ESXi keeps a line
break, a tab or an escape sequence in a display name. Printed raw, ``web01\\n+ backup evil`` would fake a
line of a plan, a table row or a log line, and ``\\x1b[2J`` would drive the terminal. Every place that
prints such text for people (plan, ``points``, ``status``, restore/export/backup messages, error
messages, console log lines) passes it through :func:`printable`; JSON output keeps the real string
(JSON escapes it itself).
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every control or otherwise invisible-formatting character escaped as Python does in
    a string literal (``\\n``, ``\\t``, ``\\x1b``, ``\\u202e``), so it stays on one line and cannot move
    the cursor, recolour the terminal or reverse the text; letters of every script, and spaces, stay."""
    if text.isprintable():  # the common case, in C: nothing to escape (a space is printable)
        return text
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
