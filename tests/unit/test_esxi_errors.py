"""Every error that leaves the host layer is an ``EsxiError`` that says whether a retry may help and
which host it is about: the translation where pyVmomi, the socket library, urllib3 and paramiko are
called, and the facade naming the host. No host needed: local sockets and a local HTTPS server."""

from __future__ import annotations

import datetime
import errno
import hashlib
import http.client
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyVmomi import vim, vmodl

from reconciler.esxi.api import ApiSession, mapped_faults
from reconciler.esxi.errors import (
    ApiAuthError,
    ApiError,
    CommandError,
    EsxiError,
    ForeignSnapshotError,
    HostConnectionError,
    RestrictedByLicenseError,
    ShellError,
    SnapshotError,
    SshDisabledError,
    TaskTimeoutError,
    TransportError,
)
from reconciler.esxi.host import EsxiHost
from reconciler.esxi.shell import ShellSession, SshTarget
from reconciler.esxi.tls import format_thumbprint, pinned_context
from reconciler.esxi.transport import HttpsRangeReader
from reconciler.facts.inventory import FrozenDisk
from reconciler.operations.retry import classify

DISK = FrozenDisk(
    2000, "Hard disk 1", "scsi0:0", "[ds] vm/vm.vmdk", "[ds] vm/vm-flat.vmdk", 1 << 20, None, None, ""
)


def closed_port() -> int:
    """A local port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the attribute -----------------------------------------------------------------------------------


def raised(outer: EsxiError, cause: BaseException) -> EsxiError:
    """``outer`` as raised ``from cause``."""
    try:
        raise outer from cause
    except EsxiError as exc:
        return exc


def test_a_class_fixes_the_kind_an_instance_may_say_it_and_a_wrapper_is_as_its_cause() -> None:
    assert TaskTimeoutError("still running").transient
    assert not ForeignSnapshotError("not ours").transient
    assert not EsxiError("2 VMs named 'x'").transient  # no cause: terminal
    assert EsxiError("x", transient=True).transient
    assert raised(EsxiError("power on over SSH"), ShellError("connection lost")).transient
    assert not raised(
        EsxiError("power on over SSH"), CommandError("vim-cmd", 1, "", "Power on failed")
    ).transient
    assert raised(SnapshotError("removing"), ConnectionResetError(errno.ECONNRESET, "reset")).transient
    assert not raised(ForeignSnapshotError("not ours"), ShellError("lost")).transient  # the class wins


def test_vim_cmd_reporting_a_busy_hostd_is_transient() -> None:
    assert CommandError(
        "vim-cmd vmsvc/power.on 1", 1, "", "Failed to login: Connection reset by peer"
    ).transient
    busy = '(vim.fault.TaskInProgress) {\n   msg = "Another task is already in progress."\n}'
    assert CommandError("vim-cmd vmsvc/snapshot.create 1", 1, busy, "", "TaskInProgress").transient
    assert not CommandError("vim-cmd vmsvc/power.on 1", 1, "", "Power on failed").transient
    assert not CommandError("mkdir /vmfs/volumes/ds/x", 1, "", "File exists").transient


# -- pyVmomi and the socket library ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind", "transient"),
    [
        (vim.fault.RestrictedVersion(msg="prohibits execution"), RestrictedByLicenseError, False),  # type: ignore[no-untyped-call]
        (vim.fault.InvalidLogin(msg="Cannot complete login"), ApiAuthError, False),  # type: ignore[no-untyped-call]
        (vim.fault.NoPermission(msg="Permission to perform this operation was denied."), ApiAuthError, False),  # type: ignore[no-untyped-call]
        (vmodl.fault.HostNotConnected(msg="not connected"), ApiError, True),  # type: ignore[no-untyped-call]
        (vim.fault.TaskInProgress(msg="busy"), ApiError, True),  # type: ignore[no-untyped-call]
        (vim.fault.InvalidState(msg="invalid state"), ApiError, False),  # type: ignore[no-untyped-call]
        (vim.fault.NotFound(msg="not found"), ApiError, False),  # type: ignore[no-untyped-call]
        (ConnectionResetError(errno.ECONNRESET, "reset"), HostConnectionError, True),
        (TimeoutError("timed out"), HostConnectionError, True),
        (http.client.HTTPException("503 Service Unavailable"), HostConnectionError, True),
        (http.client.RemoteDisconnected("Remote end closed connection"), HostConnectionError, True),
        (
            socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
            HostConnectionError,
            True,
        ),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), HostConnectionError, False),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), HostConnectionError, True),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), HostConnectionError, False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_api_and_network_errors_are_translated(error: BaseException, kind: type, transient: bool) -> None:
    with pytest.raises(EsxiError) as err, mapped_faults("list VMs", "esxi1"):
        raise error
    assert type(err.value) is kind and err.value.__cause__ is error
    assert err.value.transient is transient and err.value.host == "esxi1"
    assert classify(err.value) == ("transient" if transient else "terminal")


def test_the_outermost_boundary_names_the_host_and_other_errors_pass() -> None:
    outer, inner = mapped_faults("list VMs", "esxi1"), mapped_faults("service content", "10.0.0.5")
    with pytest.raises(HostConnectionError) as err, outer, inner:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert err.value.host == "esxi1"
    with pytest.raises(ValueError), mapped_faults("vm", "esxi1"):
        raise ValueError("not a vmid: 'web01'")  # a bug or bad input stays what it is


# -- through the facade and the sessions -------------------------------------------------------------


PIN = format_thumbprint(hashlib.sha256(b"no such certificate").digest())


def test_an_unreachable_host_is_a_transient_error_naming_it() -> None:
    port = closed_port()
    api = ApiSession("127.0.0.1", port, "root", lambda: "secret", PIN)
    shell = ShellSession(SshTarget("127.0.0.1", port, "root", "SHA256:x", password=lambda: "secret"))
    with EsxiHost(api, shell, name="esxi1") as host:
        for call in (host.list_vms, lambda: host.license, lambda: host.read_file("[ds] vm/vm.vmx")):
            with pytest.raises(EsxiError) as err:
                call()
            assert isinstance(err.value, HostConnectionError | ShellError), err.value
            assert err.value.host == "esxi1" and err.value.transient, err.value
            assert "secret" not in str(err.value)


def test_ssh_needed_but_disabled_is_terminal() -> None:
    api = ApiSession("127.0.0.1", closed_port(), "root", lambda: "secret", PIN)
    with EsxiHost(api, None, name="esxi1") as host, pytest.raises(SshDisabledError) as err:
        host.allocation(DISK)
    assert err.value.host == "esxi1" and not err.value.transient and classify(err.value) == "terminal"


# -- HTTPS /folder (urllib3) -------------------------------------------------------------------------


def certificate(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """A self-signed certificate and key (files) and its SHA-256 pin."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pin = format_thumbprint(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())
    return cert_file, key_file, pin


class Folder(http.server.BaseHTTPRequestHandler):
    """``/folder/busy`` answers 503, ``/folder/missing`` 404, anything else 206 with one byte."""

    def do_GET(self) -> None:
        if self.path.startswith("/folder/busy"):
            self.send_response(503)
        elif self.path.startswith("/folder/missing"):
            self.send_response(404)
        else:
            self.send_response(206)
            self.send_header("Content-Range", "bytes 0-0/4096")
            self.send_header("Content-Length", "1")
            self.end_headers()
            self.wfile.write(b"x")
            return
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def folder_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A local HTTPS server like ESXi's ``/folder``: its port and its certificate's pin."""
    cert_file, key_file, pin = certificate(tmp_path, "esxi.local")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], pin
    finally:
        server.shutdown()
        server.server_close()


def test_https_statuses_say_whether_to_retry(folder_server: tuple[int, str]) -> None:
    port, pin = folder_server
    reader = HttpsRangeReader(
        "127.0.0.1", port, pinned_context("127.0.0.1", port, pin), cookie="c", host="esxi1"
    )
    try:
        assert reader.size("[ds] vm/vm-flat.vmdk") == 4096  # the pinned certificate is accepted
        with pytest.raises(TransportError) as busy:
            reader.size("[ds] busy")
        assert busy.value.transient and busy.value.host == "esxi1" and "503" in str(busy.value)
        with pytest.raises(TransportError) as missing:
            reader.get_file("[ds] missing")
        assert not missing.value.transient and "404" in str(missing.value)
    finally:
        reader.close()


def test_a_swapped_certificate_is_terminal_and_a_refused_connection_transient(
    folder_server: tuple[int, str], tmp_path: Path
) -> None:
    port, _ = folder_server
    cert_file, _, _ = certificate(tmp_path, "other")
    trusting_another = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trusting_another.check_hostname = False
    trusting_another.load_verify_locations(cert_file)
    reader = HttpsRangeReader("127.0.0.1", port, trusting_another, cookie="c", host="esxi1")
    try:
        with pytest.raises(TransportError) as swapped:
            reader.size("[ds] vm/vm-flat.vmdk")
        assert not swapped.value.transient and classify(swapped.value) == "terminal"
    finally:
        reader.close()
    refused = HttpsRangeReader("127.0.0.1", closed_port(), trusting_another, cookie="c", host="esxi1")
    try:
        with pytest.raises(TransportError) as down:
            refused.size("[ds] vm/vm-flat.vmdk")
        assert down.value.transient and classify(down.value) == "transient" and down.value.host == "esxi1"
    finally:
        refused.close()
