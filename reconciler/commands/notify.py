"""``esxi-reconciler notify test NAME``: send a test message through a Notifier of the config."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import structlog

from reconciler.commands.common import (
    ExitCode,
    add_command,
    emit_json,
    fail,
    load_desired,
    state_dir,
    unknown_name,
)
from reconciler.printable import printable

if TYPE_CHECKING:
    from reconciler.config.model import Notifier
    from reconciler.notify.rules import Message
    from reconciler.notify.send import SendResult

log = structlog.get_logger(__name__)

_NOTIFY_EXAMPLES = """\
examples:
  esxi-reconciler notify test ops-mail      send a test message through the Notifier ops-mail
  esxi-reconciler notify test ops-mail --json

The message goes out at once (one attempt; the daemon retries, this does not), and
the result is recorded in the history (`esxi-reconciler history --kind notify`) when
the state directory is writable. Exit 0 sent; 1 the service did not take it (the
line says why, without secrets); 64 no such notifier; 78 its secret cannot be read
or apprise does not understand its URL.
"""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "notify",
        help="test the notifiers (e-mail, ntfy, Gotify, webhooks …)",
        description="Work with the Notifier documents of the configuration.",
        epilog=_NOTIFY_EXAMPLES,
        handler=_notify_usage,
    )
    verbs = parser.add_subparsers(dest="notify_command", metavar="SUBCOMMAND")
    test = add_command(
        verbs,
        "test",
        help="send a test message through a notifier",
        description="Send a test message through the Notifier NAME now and say whether it was taken.",
        epilog=_NOTIFY_EXAMPLES,
        handler=cmd_notify_test,
    )
    test.add_argument("notifier", metavar="NAME", help="name of a Notifier document")


def _notify_usage(args: argparse.Namespace) -> int:
    fail("give a subcommand: test (see notify --help)", "usage", "usage")


def cmd_notify_test(args: argparse.Namespace) -> int:
    """0 sent, 1 not taken, 64 unknown name, 78 unusable notifier."""
    from reconciler.notify.rules import message_for_test
    from reconciler.notify.send import NotifierError, check, send_once

    desired = load_desired(args)
    if args.notifier not in desired.notifiers:
        unknown_name("notify test", "Notifier", args.notifier, sorted(desired.notifiers))
    notifier = desired.notifiers[args.notifier]
    try:
        check(notifier)
    except NotifierError as exc:
        fail(f"{exc}", "notifier-unusable", "config")
    import socket

    now = datetime.now(timezone.utc)
    message = message_for_test(notifier.name, now, origin=socket.gethostname())
    result = send_once(notifier, message)
    _record(args, now, notifier, message, result)
    if not result.ok:
        fail(
            f"notifier {notifier.name}: not sent: {result.error}; check that the service is up and"
            f" reachable from this machine, and spec.url and its secrets ({notifier.source})",
            "notify-failed",
        )
    if args.json:
        emit_json(
            {
                "ok": True,
                "notifier": notifier.name,
                "url": notifier.url,
                "title": message.title,
                "attempts": result.attempts,
                "seconds": round(result.seconds, 3),
            }
        )
    else:
        print(f"sent a test message through {notifier.name} ({printable(notifier.url)}): {message.title}")
    return ExitCode.OK


def _record(
    args: argparse.Namespace, now: datetime, notifier: Notifier, message: Message, result: SendResult
) -> None:
    """The send in the history, when the state directory can be written (best effort)."""
    from reconciler.notify.service import record_send
    from reconciler.status.store import StatusStore, status_path

    try:
        with StatusStore.open(status_path(state_dir(args))) as store:
            record_send(store, now, notifier, message, result)
    except Exception as exc:  # noqa: BLE001  the record is a courtesy; the verb says what happened
        log.debug("notify.not_recorded", error=str(exc))
