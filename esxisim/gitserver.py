"""Git servers for tests: bare repositories served over a real OpenSSH server, like a Gitea or GitLab
reached with a deploy key (:class:`GitServer`), and over HTTPS by git's own ``git http-backend`` with
a private CA and an access token (:class:`HttpsGitServer`).

The sshd runs as the simulated hosts' does (:mod:`esxisim.sshd`): in a private mount namespace
(``unshare --mount``), where a tmpfs on ``/run`` gives it ``/run/sshd`` without touching the machine's
``/run``; killing the namespace ends every session. Only the deploy key may log in, and its
``authorized_keys`` line is restricted to git (``git-shell``: no shell, no forwarding, no pty), as a
forge's deploy keys are. The host key is a fresh ed25519 key that the client must pin.

Files under ``directory``::

    ssh/sshd_config, ssh/ssh_host_ed25519_key[.pub]   the server
    ssh/authorized_keys                               the deploy key, restricted to git-shell
    deploy_key[.pub]                                  the client's deploy key (what the daemon uses)
    repos/<name>.git                                  the bare repositories
    sshd.log, sshd.pid
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import ssl
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from typing import Any

from esxisim import procs
from esxisim.sshd import SshError, free_port, keygen, public_key, wait_banner

SSHD = "/usr/sbin/sshd"


def _config(directory: Path, port: int) -> str:
    ssh = directory / "ssh"
    return "\n".join(
        [
            "# esxisim git server: bare repositories for the deploy key only",
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {ssh / 'ssh_host_ed25519_key'}",
            "PidFile none",
            f"AuthorizedKeysFile {ssh / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "LogLevel VERBOSE",
            "",
        ]
    )


class GitServer:
    """An sshd serving the bare repositories under ``directory/repos``. ``start()`` / ``stop()``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ssh_dir = directory / "ssh"
        self.repos = directory / "repos"
        self.deploy_key = directory / "deploy_key"
        self.log = directory / "sshd.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._ns: str | None = None

    @property
    def host_key(self) -> str:
        """The server's public host key, ``TYPE BASE64``: what a client pins."""
        kind, blob = public_key(self.ssh_dir / "ssh_host_ed25519_key")
        return f"{kind} {blob}"

    def url(self, name: str) -> str:
        """The ssh:// URL of repository ``name``."""
        return f"ssh://root@127.0.0.1:{self.port}{self.repos / name}.git"

    def create(self, name: str) -> Path:
        """A new empty bare repository ``name``; its path."""
        path = self.repos / f"{name}.git"
        subprocess.run(["git", "init", "--bare", "-q", str(path)], check=True)
        return path

    def start(self, timeout: float = 20.0) -> None:
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        self.repos.mkdir(parents=True, exist_ok=True)
        keygen(self.ssh_dir / "ssh_host_ed25519_key", "ed25519", None, "git-server")
        keygen(self.deploy_key, "ed25519", None, "deploy-key")
        kind, blob = public_key(self.deploy_key)
        restricted = 'restrict,command="git-shell -c \\"$SSH_ORIGINAL_COMMAND\\""'
        (self.ssh_dir / "authorized_keys").write_text(f"{restricted} {kind} {blob} deploy-key\n")
        self.port = free_port()
        config = self.ssh_dir / "sshd_config"
        config.write_text(_config(self.directory, self.port))
        script = (
            f"mount -t tmpfs -o mode=755 tmpfs /run && mkdir /run/sshd && exec {SSHD} -D -e -f '{config}'"
        )
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=procs.die_with_parent,
            )
        try:
            wait_banner(self.port, self._proc.pid, timeout, self.log)
        except SshError:
            self.stop()
            raise
        self._ns = procs.mnt_ns(self._proc.pid)
        if self._ns is None or self._ns == procs.own_mnt_ns():
            self.stop()
            raise SshError("the git server's sshd is not in a private mount namespace")

    def stop(self) -> None:
        """End sshd and every session of its namespace."""
        if self._proc is None:
            return
        if self._ns is not None:
            procs.kill_namespace(self._ns)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self._proc = None
        self._ns = None

    def __enter__(self) -> GitServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- HTTPS: git http-backend behind a small TLS server -------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_tls_files(directory: Path) -> None:
    """A fresh CA (``ca.pem``) and a certificate for 127.0.0.1/localhost it signed (``server.pem``,
    ``server.key``), as a forge with a private CA has."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=esxisim git test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory
    )
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip


def _read_chunked(stream: BufferedIOBase) -> bytes:
    """The body of a request sent with ``Transfer-Encoding: chunked`` (git does for large pushes)."""
    body = b""
    while True:
        size = int(stream.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while stream.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return body
        body += stream.read(size)
        stream.readline()


class _GitHttpHandler(BaseHTTPRequestHandler):
    """One request: Basic authentication checked, then ``git http-backend`` as a CGI."""

    server: _GitHttpServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        self.server.owner.record(self.requestline, format % args)

    def _user(self) -> str | None:
        """The authenticated user; None when the credentials are missing or wrong."""
        expected = self.server.owner.credentials
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, token = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if expected is None or not (
            hmac.compare_digest(user, expected[0]) and hmac.compare_digest(token, expected[1])
        ):
            return None
        return user

    def _serve(self) -> None:
        owner = self.server.owner
        user = self._user()
        if owner.credentials is not None and user is None:
            body = b"authentication required\n"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = _read_chunked(self.rfile)
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(owner.directory),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_PROJECT_ROOT": str(owner.repos),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": urllib.parse.unquote(path),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(data)),
            "REMOTE_ADDR": self.client_address[0],
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        if user is not None:
            env["REMOTE_USER"] = user  # lets http-backend accept pushes
        cgi = subprocess.run(["git", "http-backend"], input=data, capture_output=True, env=env, timeout=60)
        head, _, body = cgi.stdout.partition(b"\r\n\r\n")  # http-backend ends its headers with CRLF
        status = 200 if cgi.returncode == 0 else 500
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _GitHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: HttpsGitServer


class HttpsGitServer:
    """Bare repositories under ``directory/repos`` served over HTTPS by ``git http-backend``, with a
    certificate from a private CA (``ca_file``) and, when ``credentials`` (user, token) are given, only
    to requests that present them (HTTP Basic, as a forge's access tokens are used). ``start()`` /
    ``stop()``; ``requests`` lists what was asked (request line and status, never a header)."""

    def __init__(self, directory: Path, credentials: tuple[str, str] | None = None) -> None:
        self.directory = directory
        self.repos = directory / "repos"
        self.tls = directory / "tls"
        self.credentials = credentials
        self.requests: list[str] = []
        self.port = 0
        self._server: _GitHttpServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ca_file(self) -> Path:
        """The PEM of the CA that signed the server's certificate (what a client trusts)."""
        return self.tls / "ca.pem"

    def url(self, name: str) -> str:
        """The https:// URL of repository ``name``."""
        return f"https://127.0.0.1:{self.port}/{name}.git"

    def create(self, name: str) -> Path:
        """A new empty bare repository ``name``; its path (push to it as ``file://`` directly)."""
        path = self.repos / f"{name}.git"
        subprocess.run(["git", "init", "--bare", "-q", str(path)], check=True)
        return path

    def record(self, requestline: str, message: str) -> None:
        with self._lock:
            self.requests.append(message)

    def start(self) -> None:
        self.repos.mkdir(parents=True, exist_ok=True)
        make_tls_files(self.tls)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls / "server.pem", self.tls / "server.key")
        server = _GitHttpServer(("127.0.0.1", 0), _GitHttpHandler)
        server.owner = self
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="https-git-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = None
        self._thread = None

    def __enter__(self) -> HttpsGitServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
