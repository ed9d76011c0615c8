"""Sending notifications: apprise behind a bounded queue and a sender thread per notifier. The only module
that imports apprise (the ``notify-libraries`` import contract).

apprise speaks the services people use (SMTP with STARTTLS or TLS, ntfy, Gotify, Slack, Discord, Teams,
Telegram, Pushover, JSON webhooks …) from one URL, so this module only fills the notifier's secrets into
its URL, sends, and says in one line what went wrong. A send never blocks a backup: the daemon hands
messages to :class:`Dispatcher` (a full queue drops the newest with a log line, never waits), whose
threads retry with backoff and report each final result, without secrets, to a callback (the daemon
records it in the history).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

import apprise
import structlog

from reconciler.config.model import Notifier
from reconciler.config.secrets import SecretError
from reconciler.notify.rules import Message

# apprise's plugins, loaded on first use, import the deprecated imghdr: a warning line in a verb's output
# that is neither ours to fix nor the user's to read
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"apprise(\.|$)")

log = structlog.get_logger(__name__)

# apprise's own log lines go only to the capture of each send (below), which is redacted and becomes our
# own event: one line per failure, never a URL with a token in it.
logging.getLogger(apprise.LOGGER_NAME if hasattr(apprise, "LOGGER_NAME") else "apprise").propagate = False

QUEUE_SIZE = 100
"""Messages waiting to be sent, per notifier; beyond it the newest is dropped (the daemon never waits
for a send)."""
RETRY_DELAYS = (10.0, 60.0, 300.0)
"""Seconds before the 2nd, 3rd and 4th attempt of a message that failed."""
REDACTED = "***"

_LEVELS = {
    "failure": apprise.NotifyType.FAILURE,
    "warning": apprise.NotifyType.WARNING,
    "success": apprise.NotifyType.SUCCESS,
    "info": apprise.NotifyType.INFO,
}


class NotifierError(Exception):
    """A notifier cannot be used at all: a secret cannot be read, apprise does not know the URL."""


@dataclass(frozen=True)
class SendResult:
    """How a send ended: ``error`` in one line without secrets; ``attempts`` made."""

    ok: bool
    error: str | None = None
    attempts: int = 1
    seconds: float = 0.0


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret value (also URL-encoded) replaced by ``***``."""
    for value in sorted(secrets, key=len, reverse=True):
        for form in {value, quote(value, safe=""), quote_plus(value), quote(value)}:
            if form:
                text = text.replace(form, REDACTED)
    return text


def resolve_url(notifier: Notifier) -> tuple[str, list[str]]:
    """The notifier's URL with its secrets filled in (URL-encoded), and the secret values (to redact
    whatever is said about it). Raises :class:`NotifierError` naming the reference, never a value."""
    url = notifier.url
    values: list[str] = []
    for name, secret in notifier.secrets.items():
        try:
            value = secret.reveal()
        except SecretError as exc:
            raise NotifierError(f"notifier {notifier.name}: secret {{{name}}}: {exc}") from None
        values.append(value)
        url = url.replace("{" + name + "}", quote(value, safe=""))
    return url, values


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def url_problem(notifier: Notifier) -> str | None:
    """Why apprise cannot use the notifier's URL (its scheme or form), checked without its secrets (each
    placeholder stands in as ``x``), or None: for ``validate``, which reads no secret."""
    url = re.sub(r"\{[^{}]*\}", "x", notifier.url)
    if apprise.Apprise().add(url):
        return None
    return (
        f"apprise does not understand the URL (scheme {_scheme(url)}://): this notifier cannot send;"
        " check it against the apprise documentation"
    )


def check(notifier: Notifier) -> None:
    """Raise :class:`NotifierError` when ``notifier`` cannot send at all (a secret that cannot be read, a
    URL apprise does not understand)."""
    url, _ = resolve_url(notifier)
    if not apprise.Apprise().add(url):
        raise NotifierError(
            f"notifier {notifier.name}: apprise does not understand the URL (scheme {_scheme(url)}://);"
            " check spec.url against the apprise documentation"
        )


def send_once(notifier: Notifier, message: Message) -> SendResult:
    """One attempt to deliver ``message`` through ``notifier``."""
    started = time.monotonic()
    try:
        url, secrets = resolve_url(notifier)
    except NotifierError as exc:
        return SendResult(False, str(exc), 1, time.monotonic() - started)
    sender = apprise.Apprise()
    if not sender.add(url):
        unknown = f"apprise does not understand the URL (scheme {_scheme(url)}://)"
        return SendResult(False, unknown, 1, time.monotonic() - started)
    with apprise.LogCapture(level=logging.DEBUG) as captured:  # type: ignore[no-untyped-call]
        try:
            ok = bool(
                sender.notify(
                    title=message.title,
                    body=message.body,
                    notify_type=_LEVELS[message.level],
                    body_format=apprise.NotifyFormat.TEXT,  # our lines stay lines, in a mail too
                )
            )
        except Exception as exc:  # noqa: BLE001  a plugin's bug must not end the sender thread
            ok = False
            captured.write(f"x - ERROR - {type(exc).__name__}: {exc}\n")
        said = captured.getvalue()
    error: str | None = None
    if not ok:
        error = redact(_cause(said) or "the service did not accept the message", secrets)
    return SendResult(ok, error, 1, time.monotonic() - started)


def _cause(log_text: str) -> str:
    """What apprise said went wrong: its warnings and errors, and the exception behind a "raised an
    exception" (logged at debug level), one line."""
    said = []
    for line in log_text.splitlines():
        parts = line.split(" - ", 2)
        if len(parts) != 3:
            continue
        level, text = parts[1], parts[2].strip()
        if level in ("WARNING", "ERROR", "CRITICAL") or text.startswith(
            ("Notification Exception:", "Socket")
        ):
            said.append(text.removeprefix("Notification Exception: "))
    return "; ".join(dict.fromkeys(said))[-600:]


OnResult = Callable[[Notifier, Message, SendResult], None]
Send = Callable[[Notifier, Message], SendResult]


class Dispatcher:
    """The queues and the sender threads: one of each per notifier, so a service that is down (its
    message waiting minutes between retries) never holds up the messages of another. ``submit`` never
    blocks; each message is tried up to ``1 + len(delays)`` times; ``on_result`` gets its final result
    (from a sender thread)."""

    def __init__(
        self,
        on_result: OnResult,
        *,
        send: Send = send_once,
        delays: Sequence[float] = RETRY_DELAYS,
        size: int = QUEUE_SIZE,
    ) -> None:
        self._on_result = on_result
        self._send = send
        self._delays = tuple(delays)
        self._size = size
        self._queues: dict[str, queue.Queue[tuple[Notifier, Message]]] = {}
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0

    def start(self) -> None:
        with self._idle:
            self._started = True
            for name, lane in self._queues.items():
                self._start_thread(name, lane)

    def _start_thread(self, name: str, lane: queue.Queue[tuple[Notifier, Message]]) -> None:
        thread = threading.Thread(target=self._run, args=(lane,), name=f"notify-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _lane(self, name: str) -> queue.Queue[tuple[Notifier, Message]]:
        """The queue of notifier ``name`` (and its thread, once started); call with ``_idle`` held."""
        lane = self._queues.get(name)
        if lane is None:
            lane = self._queues[name] = queue.Queue(maxsize=self._size)
            if self._started and not self._stop.is_set():
                self._start_thread(name, lane)
        return lane

    def submit(self, notifier: Notifier, message: Message) -> bool:
        """Queue ``message``; False (and a log line and a recorded result) when the notifier's queue is
        full."""
        with self._idle:
            try:
                self._lane(notifier.name).put_nowait((notifier, message))
            except queue.Full:
                log.warning(
                    "notify.dropped", notifier=notifier.name, title=message.title, reason="queue full"
                )
                self._report(notifier, message, SendResult(False, "not sent: the send queue is full", 0))
                return False
            self._busy += 1
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted message has its result (for tests and ``run --once``)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the messages being sent (no more retries wait); give up after ``timeout`` in all."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._stop.set()
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not threads:
            self._drain()

    def _report(self, notifier: Notifier, message: Message, result: SendResult) -> None:
        try:
            self._on_result(notifier, message, result)
        except Exception:
            log.exception("notify.record_failed", notifier=notifier.name)

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def _run(self, lane: queue.Queue[tuple[Notifier, Message]]) -> None:
        while not self._stop.is_set():
            try:
                notifier, message = lane.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._deliver(notifier, message)
            finally:
                self._done()
        self._drain(lane)

    def _drain(self, lane: queue.Queue[tuple[Notifier, Message]] | None = None) -> None:
        """At stop: what is still queued (in ``lane``, or everywhere) is reported as not sent."""
        with self._idle:
            lanes = [lane] if lane is not None else list(self._queues.values())
        for each in lanes:
            while True:
                try:
                    notifier, message = each.get_nowait()
                except queue.Empty:
                    break
                self._report(notifier, message, SendResult(False, "not sent: the daemon stopped", 0))
                self._done()

    def _deliver(self, notifier: Notifier, message: Message) -> None:
        attempts = 0
        spent = 0.0
        result = SendResult(False, "not sent", 0)
        for delay in (0.0, *self._delays):
            if delay and self._stop.wait(delay):
                break  # stopping: no more waiting
            attempts += 1
            try:
                result = self._send(notifier, message)
            except Exception as exc:  # noqa: BLE001  the sender thread must survive anything
                result = SendResult(False, f"{type(exc).__name__}: {exc}")
            spent += result.seconds
            if result.ok:
                break
            log.info("notify.attempt_failed", notifier=notifier.name, attempt=attempts, error=result.error)
        final = SendResult(result.ok, result.error, attempts, spent)
        (log.info if final.ok else log.warning)(
            "notify.sent" if final.ok else "notify.failed",
            notifier=notifier.name,
            kind=message.kind,
            title=message.title,
            attempts=attempts,
            error=final.error,
        )
        self._report(notifier, message, final)
