"""The HTTP(S) listener of ``esxi-reconciler run``: the standard library's threading HTTP server in a
thread of its own, so a slow client or a long page never touches the loop or a backup.

Routes: ``/healthz`` (the process answers), ``/readyz`` (a valid config is in force and a cycle runs or
finished recently), ``/metrics`` (Prometheus text format), ``/`` (the status page), ``POST /hooks/git``
(fetch the git source now). With a token, every route but the two health checks asks for it; the
webhook always does. Each request reads the status store through its own read-only connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from reconciler.config.model import Listen
from reconciler.config.secrets import SecretError
from reconciler.web.view import DaemonState, Snapshot

log = structlog.get_logger(__name__)

MAX_BODY = 1 << 20
"""Largest webhook body read (a forge's push event is a few KiB to a few hundred)."""
REQUEST_TIMEOUT = 30.0
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)
REALM = 'Basic realm="esxi-reconciler", charset="UTF-8"'


@dataclass(frozen=True)
class Routes:
    """What the listener serves, given by the daemon: the snapshot of now, the loop's own state, how old
    the last cycle may be, and the git source's "fetch now" (None: the daemon follows no git source)."""

    snapshot: Callable[[], Snapshot]
    daemon: Callable[[], DaemonState | None]
    ready_after: Callable[[], timedelta]
    clock: Callable[[], datetime]
    poll_source: Callable[[], None] | None = None


def readiness(daemon: DaemonState | None, now: datetime, ready_after: timedelta) -> tuple[bool, str]:
    """Whether ``/readyz`` says ready, and why (pure)."""
    if daemon is None:
        return False, "the daemon has not started"
    if not daemon.config_loaded:
        return False, "no valid config is loaded (see the config condition)"
    if daemon.cycle_running:
        return True, f"cycle {daemon.cycles} running"
    if daemon.last_cycle_finished is None:
        return False, "no cycle has finished yet"
    age = now - daemon.last_cycle_finished
    if age > ready_after:
        return (
            False,
            f"the last cycle finished {int(age.total_seconds())} s ago"
            f" (more than {int(ready_after.total_seconds())} s)",
        )
    return True, f"last cycle finished {int(age.total_seconds())} s ago"


def token_matches(token: str, headers: Any, body: bytes) -> bool:
    """The request carries ``token``: ``Authorization: Bearer``, HTTP basic (the password, any user),
    ``X-Gitlab-Token``, or a ``X-Hub-Signature-256`` HMAC of the body (GitHub, Gitea, Forgejo)."""
    expected = token.encode()
    given: list[bytes] = []
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        given.append(value.strip().encode())
    elif scheme.lower() == "basic":
        with contextlib.suppress(ValueError):
            given.append(base64.b64decode(value.strip(), validate=True).partition(b":")[2])
    if "X-Gitlab-Token" in headers:
        given.append(headers["X-Gitlab-Token"].encode())
    signature = headers.get("X-Hub-Signature-256", "")
    if signature.startswith("sha256="):
        mac = hmac.new(expected, body, hashlib.sha256).hexdigest()
        if hmac.compare_digest(signature.removeprefix("sha256=").encode(), mac.encode()):
            return True
    return any(hmac.compare_digest(candidate, expected) for candidate in given)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "esxi-reconciler"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("web.request", client=self.client_address[0], line=format % args)

    def _send(
        self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, message: str, **headers: str) -> None:
        self._send(status, (message + "\n").encode(), **headers)

    def _authorized(self, body: bytes = b"", *, required: bool = False) -> bool:
        """True when the request may go on; else the refusal is sent."""
        secret = self.server.listen.token
        if secret is None:
            if not required:
                return True
            self._text(
                HTTPStatus.FORBIDDEN,
                "the webhook needs a token: set spec.listen.token of the Monitoring document",
            )
            return False
        try:
            token = secret.reveal()
        except SecretError as exc:
            log.error("web.token_unreadable", error=str(exc))
            self._text(
                HTTPStatus.INTERNAL_SERVER_ERROR, "the listener's token cannot be read (see the daemon's log)"
            )
            return False
        if token_matches(token, self.headers, body):
            return True
        log.warning("web.refused", client=self.client_address[0], path=urlsplit(self.path).path)
        self._text(
            HTTPStatus.UNAUTHORIZED,
            "a valid token is needed (Authorization: Bearer TOKEN)",
            WWW_Authenticate=REALM,
        )
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        routes = self.server.routes
        try:
            if path == "/healthz":
                self._text(HTTPStatus.OK, "ok")
            elif path == "/readyz":
                ready, why = readiness(routes.daemon(), routes.clock(), routes.ready_after())
                self._text(
                    HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                    ("ready: " if ready else "not ready: ") + why,
                )
            elif path in ("/", "/index.html", "/metrics"):
                if not self._authorized():
                    return
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    from reconciler.web.metrics import exposition

                    self._send(HTTPStatus.OK, exposition(routes.snapshot()), CONTENT_TYPE_LATEST)
                else:
                    from reconciler.web.page import render_page

                    self._send(
                        HTTPStatus.OK, render_page(routes.snapshot()).encode(), "text/html; charset=utf-8"
                    )
            elif path == "/hooks/git":
                self._text(HTTPStatus.METHOD_NOT_ALLOWED, "use POST", Allow="POST")
            else:
                self._text(HTTPStatus.NOT_FOUND, "not found: try /, /metrics, /healthz or /readyz")
        except Exception:
            log.exception("web.failed", path=path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the daemon's log)")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path != "/hooks/git":
            self._text(
                HTTPStatus.METHOD_NOT_ALLOWED
                if path in ("/", "/metrics", "/healthz", "/readyz")
                else HTTPStatus.NOT_FOUND,
                "not here",
            )
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body must be at most {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        if not self._authorized(body, required=True):
            return
        poll = self.server.routes.poll_source
        if poll is None:
            self._text(HTTPStatus.NOT_FOUND, "this daemon follows no git source (run --source FILE)")
            return
        poll()
        log.info(
            "web.git_hook",
            client=self.client_address[0],
            forge_event=self.headers.get("X-Gitlab-Event")
            or self.headers.get("X-GitHub-Event")
            or self.headers.get("X-Gitea-Event"),
        )
        self._text(HTTPStatus.ACCEPTED, "fetching the git source now")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, listen: Listen, routes: Routes) -> None:
        self.listen = listen
        self.routes = routes
        if ":" in listen.address:
            self.address_family = socket.AF_INET6
        super().__init__((listen.address, listen.port), _Handler)
        if listen.tls_cert is not None and listen.tls_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(Path(listen.tls_cert), Path(listen.tls_key))
            # The handshake happens in the request's thread (first read), never in the accepting one.
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A dropped connection or a failed TLS handshake: one log line, not a traceback on stderr."""
        import sys

        log.warning("web.connection_failed", client=str(client_address[0]), error=str(sys.exc_info()[1]))


class Listener:
    """One running listener: :meth:`start` binds (an ``OSError`` says why not) and serves in a thread."""

    def __init__(self, listen: Listen, routes: Routes) -> None:
        self.listen = listen
        self.routes = routes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.listen.tls_cert else "http"
        host = f"[{self.listen.address}]" if ":" in self.listen.address else self.listen.address
        port = self._server.server_address[1] if self._server is not None else self.listen.port
        return f"{scheme}://{host}:{port}/"

    def start(self) -> None:
        self._server = _Server(self.listen, self.routes)
        self._thread = threading.Thread(target=self._server.serve_forever, name="web", daemon=True)
        self._thread.start()
        log.info("web.listening", url=self.url, token=self.listen.token is not None)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
