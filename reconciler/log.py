"""Logging: structured events (structlog), JSON lines for the daemon, readable lines in a terminal.

Configured once per process, by :func:`configure_logging` (the CLI does it before running any verb).
Modules log with a logger named after themselves and key/value pairs, never formatted strings::

    import structlog

    log = structlog.get_logger(__name__)
    log.info("backup.done", vm="web01", restore_point=rp.id, seconds=412)

Everything goes to **stderr**, through one :mod:`logging` handler, so the records of libraries that use
the standard library (paramiko, pyVmomi, urllib3, ``warnings``) come out in the same format; those are
shown from WARNING up. Command output proper (``validate``'s verdict, plans) goes to stdout.

Formats:

* ``console``: ``2025-01-31T02:00:00.123456Z [info     ] backup.done  [reconciler.operations] vm=web01``;
  colours only on a terminal and unless ``$NO_COLOR`` is set. Control characters in the message and in
  text values (a VM name holding a line break or an escape sequence) are shown escaped by
  :func:`reconciler.printable.printable`, so a name cannot fake a log line or drive the terminal.
* ``json``: one JSON object per line with ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``,
  ``event`` and the event's own keys. When stderr is the systemd journal (``$JOURNAL_STREAM`` names
  it), every line starts with a ``<N>`` syslog priority so journald records the right ``PRIORITY``.
* ``auto``: ``json`` when stderr is the journal or not a terminal, else ``console``.

Secrets never reach the output: :func:`redact_secrets` runs on every event, whatever its source.
Tracebacks are rendered without local variables, which could hold a revealed secret.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, Processor, WrappedLogger

from reconciler.config.secrets import Secret
from reconciler.printable import printable

LogFormat = Literal["auto", "json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

THIRD_PARTY_LEVEL = logging.WARNING
"""Records of other libraries' loggers (paramiko, pyVmomi, urllib3) are shown from this level up."""

REDACTED = "***"

_SENSITIVE = r"pass(?:word|wd|phrase)|secret|token|api_?key|private_?key|authorization|cookie"
_SENSITIVE_KEY = re.compile(_SENSITIVE, re.IGNORECASE)
# ``password=hunter2``, ``?access_token=abc&``, ``passphrase = "a b"`` inside free text.
_SENSITIVE_ASSIGNMENT = re.compile(
    rf"(?P<key>[\w.-]*(?:{_SENSITIVE})[\w.-]*)(?P<eq>\s*=\s*)(?P<value>\"[^\"]*\"|'[^']*'|[^\s&;,]+)",
    re.IGNORECASE,
)
# ``https://user:password@host/``
_URL_USERINFO = re.compile(r"(?P<prefix>\b[a-z][a-z0-9+.-]*://[^/\s:@]+):[^/\s@]+@", re.IGNORECASE)
_MAX_DEPTH = 8

# Values structlog renders itself (an exception tuple, a flag); left as they are.
_UNTOUCHED_KEYS = frozenset({"exc_info", "stack_info"})
_HANDLER_NAME = "esxi-reconciler"


def _redact_text(text: str) -> str:
    text = _SENSITIVE_ASSIGNMENT.sub(lambda m: f"{m['key']}{m['eq']}{REDACTED}", text)
    return _URL_USERINFO.sub(lambda m: f"{m['prefix']}:{REDACTED}@", text)


def _is_sensitive_key(key: object) -> bool:
    return isinstance(key, str) and bool(_SENSITIVE_KEY.search(key))


def _redacted(value: object) -> object:
    """What a sensitive key's value is shown as: ``***``, unless it cannot hold a secret (a flag)."""
    return value if value is None or isinstance(value, bool) else REDACTED


def _scrub(value: object, depth: int = 0) -> object:
    """``value`` with secrets removed: Secret objects become their reference, sensitive keys ``***``."""
    if isinstance(value, Secret):
        # A Secret holds only where the value is; show that (``Secret(env:NAME)``), never reveal it.
        return str(value)
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)) and depth >= _MAX_DEPTH:
        return "…"
    if isinstance(value, Mapping):
        return {
            key: _redacted(item) if _is_sensitive_key(key) else _scrub(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(item, depth + 1) for item in value]
    return value


def redact_secrets(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: no secret value leaves the process through a log event.

    - the value of any key whose name contains password, passwd, passphrase, secret, token, api_key,
      private_key, authorization or cookie becomes ``***`` (whatever it is but ``None`` or a boolean
      flag such as ``resolve_secrets=True``, at any depth of nested mappings);
    - :class:`~reconciler.config.secrets.Secret` objects are shown as their reference
      (``Secret(credential:esxi1-password)``); they never hold the value anyway;
    - in text (the event message, string values, records of other libraries), ``password=…``-style
      assignments and the password of ``scheme://user:password@host`` URLs become ``***``.
    """
    for key, value in list(event_dict.items()):
        if key in _UNTOUCHED_KEYS:
            continue
        if key != "event" and _is_sensitive_key(key):
            event_dict[key] = _redacted(value)
        else:
            event_dict[key] = _scrub(value)
    return event_dict


# structlog's ConsoleRenderer shows a text value holding one of these as its repr(), which escapes
# control characters already; other text values are shown as they are.
_CONSOLE_REPR_TRIGGERS = frozenset(" \t=\r\n\"'")


def printable_text(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor for the console format: the message and every text value that the renderer
    would show as it is are escaped by :func:`~reconciler.printable.printable` (the others it shows as
    their ``repr()``, escaped once already). JSON lines need nothing: JSON escapes control characters."""
    for key, value in list(event_dict.items()):
        if key in _UNTOUCHED_KEYS or not isinstance(value, str):
            continue
        if key == "event" or not _CONSOLE_REPR_TRIGGERS.intersection(value):
            event_dict[key] = printable(value)
    return event_dict


# -- where the output goes ----------------------------------------------------------------------------


def _journal_stream(stream: TextIO) -> bool:
    """True when ``stream`` is the connection to journald that systemd announced in $JOURNAL_STREAM.

    Compared by device and inode, as systemd.exec(5) asks: the variable is inherited by child processes
    (and by terminals started from a user service), so its presence alone does not mean the journal.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured by pytest)
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


def resolve_format(fmt: LogFormat, stream: TextIO | None = None) -> Literal["json", "console"]:
    """The format ``auto`` stands for on ``stream`` (default: stderr): json unless a terminal."""
    if fmt == "json" or fmt == "console":
        return fmt
    stream = sys.stderr if stream is None else stream
    if _journal_stream(stream) or not _isatty(stream):
        return "json"
    return "console"


def parse_level(level: str | int) -> int:
    """``"info"`` → :data:`logging.INFO`; ints pass through. Raises :class:`ValueError`."""
    if isinstance(level, int):
        return level
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
    return int(getattr(logging, level.upper()))


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class _Formatter(ProcessorFormatter):
    """Renders every record, structlog's or a library's; ``<N>`` priority prefixes for journald."""

    def __init__(self, *, journal: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal:
            return f"<{_syslog_priority(record.levelno)}>{text}"
        return text


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest and daemons swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # the handler lock is held here
        super().emit(record)


class _TransportErrors(logging.Filter):
    """Drops paramiko's transport-thread errors: a failed handshake (e.g. no host key of the pinned type)
    is logged there line by line with its traceback, and raised to the caller, which reports it in one
    line. Its warnings (an authentication method refused, ...) still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def configure_logging(
    fmt: LogFormat = "auto", level: str | int = "info", *, stream: TextIO | None = None
) -> Literal["json", "console"]:
    """Set up structlog and the standard library's logging for this process; return the format used.

    ``level`` applies to this project's loggers (``reconciler.*``); other libraries' records are shown
    from :data:`THIRD_PARTY_LEVEL` (or ``level``, if higher). ``stream`` defaults to the current
    ``sys.stderr``. Calling it again replaces the previous configuration.
    """
    levelno = parse_level(level)
    target = sys.stderr if stream is None else stream
    resolved = resolve_format(fmt, target)
    journal = _journal_stream(target)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: list[Processor]
    if resolved == "json":
        # format_exc_info: the traceback as text, without the local variables dict_tracebacks would add.
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ]
    else:
        colors = _isatty(target) and "NO_COLOR" not in os.environ
        renderer = [
            printable_text,
            structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback),
        ]
    formatter = _Formatter(
        journal=journal,
        foreign_pre_chain=shared,
        processors=[ProcessorFormatter.remove_processors_meta, redact_secrets, *renderer],
    )

    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(levelno, THIRD_PARTY_LEVEL))
    logging.getLogger("reconciler").setLevel(levelno)
    transport = logging.getLogger("paramiko.transport")
    if not any(isinstance(f, _TransportErrors) for f in transport.filters):
        transport.addFilter(_TransportErrors())
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: structlog.testing.capture_logs and a second configure_logging must take effect.
        cache_logger_on_first_use=False,
    )
    return resolved
