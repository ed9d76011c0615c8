"""Config issues and the one exception that carries them.

Every problem found while loading the desired state becomes a :class:`ConfigIssue` with the file
(relative to the config directory), the 1-based line and column, the field path and a message. The
loader collects all of them and raises a single :class:`ConfigError`, so a user fixes every mistake
in one round instead of one per run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class ConfigIssue:
    """One problem in the desired state, at a precise place.

    ``str(issue)`` is the format users see, e.g.
    ``hosts/esxi1.yaml:12:5 spec.ssh.port: 70000 is greater than the maximum of 65535``.
    ``line`` and ``column`` are 1-based; 0 means "the file as a whole" (e.g. a file too large to read).
    ``path`` is the dotted field path inside the document (``spec.vms.names[2]``), empty for the document
    itself.  Messages never contain secret values.
    """

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line > 0:
            where = f"{where}:{self.line}:{self.column}"
        what = f"{self.path}: {self.message}" if self.path else self.message
        return f"{where} {what}" if where else what

    def to_dict(self) -> dict[str, str | int]:
        """The issue as a JSON-friendly dict (``validate --format json``)."""
        return asdict(self)


class ConfigError(Exception):
    """The desired state is invalid; ``issues`` lists every problem found, sorted by place."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(sorted(set(issues)))
        self.notifiers: tuple[Any, ...] = ()
        """The config's Notifier objects that are valid on their own (``config.model.Notifier``), so that
        the daemon can report the invalid config through them."""
        self.monitoring: Any = None
        """The config's Monitoring object when it is valid on its own (``config.model.Monitoring``), so that
        the daemon's listener says why nothing runs."""
        super().__init__(self._summary())

    def _summary(self) -> str:
        count = len(self.issues)
        lines = [f"{count} configuration error{'s' if count != 1 else ''}:"]
        lines.extend(f"  {issue}" for issue in self.issues)
        return "\n".join(lines)
