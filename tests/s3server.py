"""A real S3 protocol server for the tests: moto's server mode in a child process on 127.0.0.1, and a
small fault-injecting HTTP proxy in front of it (throttling, 5xx, dropped connections) — real HTTP end
to end, no client mocking.

``S3_TEST_ENDPOINT`` (with ``S3_TEST_ACCESS_KEY``/``S3_TEST_SECRET_KEY``, optional ``S3_TEST_REGION``)
points the same tests at another server instead, e.g. the single-node Ceph RGW of ``make test-ceph``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import botocore.config

from reconciler.repository.s3 import S3Backend, S3Location

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """Where a test S3 server answers, with credentials; :meth:`bucket` makes a fresh bucket."""

    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"
    external: bool = False
    """Not started by the tests (``S3_TEST_ENDPOINT``): buckets are left for its owner to remove."""
    ca_file: str | None = None

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            verify=self.ca_file if self.ca_file else True,
            config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def bucket(self, name: str | None = None) -> str:
        bucket = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def location(self, bucket: str, prefix: str = "repo", endpoint: str | None = None) -> S3Location:
        return S3Location(
            bucket=bucket,
            prefix=prefix,
            endpoint=endpoint or self.endpoint,
            region=self.region,
            path_style=True,
            verify=self.ca_file if self.ca_file else True,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    def backend(self, bucket: str, prefix: str = "repo", **options: Any) -> S3Backend:
        endpoint = options.pop("endpoint", None)
        options.setdefault("settle_seconds", 0.2)  # moto lists consistently; keep GC tests quick
        return S3Backend(self.location(bucket, prefix, endpoint), **options)

    def env(self, bucket: str, prefix: str = "repo") -> dict[str, str]:
        """Environment for a child process that opens the same place (see tests' writer scripts)."""
        return {
            "S3_TEST_ENDPOINT": self.endpoint,
            "S3_TEST_ACCESS_KEY": self.access_key,
            "S3_TEST_SECRET_KEY": self.secret_key,
            "S3_TEST_REGION": self.region,
            "S3_TEST_BUCKET": bucket,
            "S3_TEST_PREFIX": prefix,
        }


@contextlib.contextmanager
def moto_server(*, cert: Path | None = None, key: Path | None = None) -> Iterator[S3Server]:
    """moto's S3 server in a child process on a free loopback port; stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    scheme = "http"
    if cert is not None and key is not None:
        command += ["-c", str(cert), "-k", str(key)]
        scheme = "https"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.2)
        yield S3Server(f"{scheme}://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def external_server() -> S3Server | None:
    """The server named by ``S3_TEST_ENDPOINT``, if set."""
    endpoint = os.environ.get("S3_TEST_ENDPOINT")
    if not endpoint:
        return None
    return S3Server(
        endpoint,
        os.environ.get("S3_TEST_ACCESS_KEY", ACCESS_KEY),
        os.environ.get("S3_TEST_SECRET_KEY", SECRET_KEY),
        os.environ.get("S3_TEST_REGION", "us-east-1"),
        external=True,
    )


# -- fault injection ---------------------------------------------------------------------------------


@dataclass
class Fault:
    """Answer the next ``times`` requests matching ``method`` and ``path`` (a regex on the path and
    query) with ``status``/``code`` — or drop the connection without an answer (``drop``)."""

    method: str
    path: str
    times: int
    status: int = 503
    code: str = "SlowDown"
    drop: bool = False
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in (method, "*") and re.search(self.path, path) is not None


@dataclass
class FaultProxy:
    """Forwards HTTP to the S3 server, answering some requests with injected faults (see :class:`Fault`).

    ``requests`` counts what reached the proxy per method, ``log`` keeps ``(method, path, status)``.
    """

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str, int]] = field(default_factory=list)
    delay: float = 0.0
    """Seconds each forwarded request waits first (a slow link)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.log.clear()

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests[method] = self.requests.get(method, 0) + 1
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    fault.hits += 1
                    return fault
        return None


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    host, _, port = proxy.upstream.removeprefix("http://").partition(":")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            fault = proxy.take(self.command, self.path)
            if fault is not None and fault.drop:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                proxy.log.append((self.command, self.path, 0))
                return
            if fault is not None:
                payload = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                    f"<Message>injected by the test proxy</Message></Error>"
                ).encode()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                proxy.log.append((self.command, self.path, fault.status))
                return
            if proxy.delay:
                time.sleep(proxy.delay)
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in (
                        "transfer-encoding",
                        "connection",
                        "content-length",
                        "date",
                        "server",
                    ):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy.log.append((self.command, self.path, answer.status))
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[tuple[FaultProxy, str]]:
    """A :class:`FaultProxy` in front of ``upstream`` (http only); yields it and its endpoint URL."""
    proxy = FaultProxy(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="s3-fault-proxy", daemon=True)
    thread.start()
    try:
        yield proxy, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(url: str, timeout: float = 30) -> None:
    """Until ``url`` answers at all (any HTTP status)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- pytest fixtures (registered in tests/conftest.py) -----------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 protocol server for the whole session: ``S3_TEST_ENDPOINT``, else moto's server."""
    external = external_server()
    if external is not None:
        yield external
        return
    with moto_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket."""
    return s3_server.bucket()


@pytest.fixture
def s3_faults(s3_server: S3Server) -> Iterator[tuple[FaultProxy, str]]:
    """A fault-injecting proxy in front of the session's S3 server: ``(proxy, endpoint)``."""
    if s3_server.endpoint.startswith("https://"):
        pytest.skip("the fault proxy forwards plain HTTP only")
    with fault_proxy(s3_server.endpoint) as pair:
        yield pair
