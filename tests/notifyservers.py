"""Local servers that receive notifications in tests: an SMTP server (aiosmtpd, optionally STARTTLS or TLS
with a certificate the test trusts, and a password) and an HTTP receiver standing in for ntfy, Gotify
and JSON webhooks. Both keep what arrived, for assertions; the receiver can be told to fail."""

from __future__ import annotations

import contextlib
import datetime
import email
import email.policy
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certificate, key) PEM files. Point
    ``SSL_CERT_FILE`` at the certificate and the client trusts it, with full verification."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "smtp.crt", directory / "smtp.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    raw: bytes
    message: EmailMessage
    authenticated_as: str | None

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def body(self) -> str:
        part = self.message.get_body(preferencelist=("plain", "html"))
        assert part is not None
        return str(part.get_content())


@dataclass
class SmtpServer:
    """aiosmtpd on 127.0.0.1. ``tls``: ``None`` (plain), ``starttls`` (required) or ``implicit``; with
    ``password``, AUTH is required (only over TLS) and checked."""

    certificate: tuple[Path, Path] | None = None
    tls: str | None = None
    user: str = "backup"
    password: str | None = None
    mails: list[Mail] = field(default_factory=list)
    port: int = 0
    _controller: Controller | None = None
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = bytes(envelope.original_content or envelope.content)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        login = getattr(session, "auth_data", None)
        who = login.login.decode() if isinstance(login, LoginPassword) else None
        with self._arrived:
            self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), raw, parsed, who))
            self._arrived.notify_all()
        return "250 OK"

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == self.user
            and self.password is not None
            and data.password.decode() == self.password
        )
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def start(self) -> SmtpServer:
        self.port = free_port()
        context = None
        if self.tls is not None:
            assert self.certificate is not None
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*map(str, self.certificate))
        kwargs: dict[str, Any] = {}
        if self.password is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True)
        if self.tls == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        elif self.tls == "implicit":
            # the whole connection is TLS; aiosmtpd only counts STARTTLS as "TLS" for AUTH
            kwargs.update(ssl_context=context, auth_require_tls=False)
        else:
            kwargs.update(auth_require_tls=False)
        self._controller = Controller(self, hostname=LOOPBACK, port=self.port, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Mail]:
        """At least ``count`` mails have arrived (or AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.mails) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} mails, {len(self.mails)} arrived")
                self._arrived.wait(remaining)
            return list(self.mails)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpReceiver:
    """An HTTP server on 127.0.0.1 that records every request; ``fail_next(n, status)`` makes the next n
    requests fail (a service that is down for a while)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._failures: list[int] = []
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._arrived:
                    status = receiver._failures.pop(0) if receiver._failures else 200
                    if status == 200:
                        receiver.requests.append(
                            Request(
                                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                            )
                        )
                    receiver._arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"id": 1}' if status == 200 else b'{"error": "unavailable"}')

            do_POST = do_PUT = do_GET = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-receiver", daemon=True)

    def start(self) -> HttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._arrived:
            self._failures.extend([status] * count)

    def wait_for(
        self, count: int, timeout: float = 30.0, where: Callable[[Request], bool] = lambda r: True
    ) -> list[Request]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len([r for r in self.requests if where(r)]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = len([r for r in self.requests if where(r)])
                    raise AssertionError(f"expected {count} requests, {got} arrived")
                self._arrived.wait(remaining)
            return [r for r in self.requests if where(r)]


@contextlib.contextmanager
def http_receiver() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@contextlib.contextmanager
def smtp_server(**options: Any) -> Iterator[SmtpServer]:
    server = SmtpServer(**options).start()
    try:
        yield server
    finally:
        server.stop()
