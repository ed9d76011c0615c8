"""TLS pinning for the vSphere API and the HTTPS datastore transport.

pyvmomi's ``SmartConnect(thumbprint=...)`` does not pin: the thumbprint is consulted only when normal
verification fails, and SmartConnect turns verification off by itself for some addresses. So we:

1. fetch the server certificate (no verification: we only look at it),
2. compare its SHA-1 or SHA-256 digest (chosen by the pin's length) with the configured thumbprint
   in constant time — :class:`PinMismatchError` on a difference,
3. build an :class:`ssl.SSLContext` whose *only* trust anchor is that certificate
   (``CERT_REQUIRED``, ``VERIFY_X509_PARTIAL_CHAIN`` so a CA-signed leaf works too, no hostname check
   since ESXi certificates name the install-time host name).

Every later connection made with the context (pyvmomi, urllib3) is thus verified against exactly the
pinned certificate; a swapped certificate between step 1 and a later connection fails the handshake.
An expired pinned certificate fails too (OpenSSL checks validity dates): renew it on the host.

Unpinned connections are refused unless ``insecure_skip_tls_verify`` is set explicitly; then a loud
warning is logged on every connection.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl

from reconciler.esxi.errors import HostConnectionError, NotPinnedError, PinMismatchError, transient_os_error

log = logging.getLogger(__name__)

_PIN = re.compile(r"^([0-9A-Fa-f]{2}:?){19}[0-9A-Fa-f]{2}$|^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$")


def format_thumbprint(digest: bytes) -> str:
    """``AA:BB:…`` (upper-case hex pairs), as ESXi, govc and openssl print it."""
    return ":".join(f"{b:02X}" for b in digest)


def parse_thumbprint(pin: str) -> tuple[str, bytes]:
    """``(algorithm, digest)`` of a SHA-1 (20 bytes) or SHA-256 (32 bytes) thumbprint; colons optional."""
    if not _PIN.match(pin.strip()):
        raise ValueError("a thumbprint is 20 (SHA-1) or 32 (SHA-256) hex pairs, e.g. AA:BB:…")
    digest = bytes.fromhex(pin.strip().replace(":", ""))
    return ("sha1" if len(digest) == 20 else "sha256"), digest


def fetch_certificate(host: str, port: int, timeout: float = 15.0) -> str:
    """The server's certificate (PEM), fetched without verifying it."""
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout)
    except OSError as exc:
        raise HostConnectionError(
            f"cannot fetch the TLS certificate of {host}:{port}: {exc}",
            host=host,
            transient=transient_os_error(exc),
        ) from exc


def check_pin(pem: str, pin: str, where: str = "") -> None:
    """Raise :class:`PinMismatchError` unless ``pem``'s digest equals the thumbprint ``pin``."""
    algorithm, want = parse_thumbprint(pin)
    got = hashlib.new(algorithm, ssl.PEM_cert_to_DER_cert(pem)).digest()
    if not hmac.compare_digest(got, want):
        raise PinMismatchError(
            f"{where or 'host'} presented a TLS certificate with {algorithm.upper()} thumbprint"
            f" {format_thumbprint(got)}, not the pinned {format_thumbprint(want)}; refusing to connect"
        )


def insecure_context(where: str) -> ssl.SSLContext:
    """A context that verifies nothing (only for ``insecure_skip_tls_verify``), with a loud warning."""
    log.warning(
        "INSECURE: connecting to %s WITHOUT verifying its TLS certificate (insecure_skip_tls_verify);"
        " anyone on the network path can read the password and the disks. Pin the thumbprint.",
        where,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_context(
    host: str, port: int, thumbprint: str | None, *, insecure: bool = False, timeout: float = 15.0
) -> ssl.SSLContext:
    """An SSL context trusting only the certificate whose thumbprint is pinned (see the module doc).

    ``thumbprint=None`` raises :class:`NotPinnedError` unless ``insecure`` is True.
    """
    where = f"{host}:{port}"
    if thumbprint is None:
        if not insecure:
            raise NotPinnedError(
                f"no TLS thumbprint pinned for {where}; set api.thumbprint (or, lab only,"
                " insecure_skip_tls_verify: true)"
            )
        return insecure_context(where)
    pem = fetch_certificate(host, port, timeout)
    check_pin(pem, thumbprint, where)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the pin replaces the name check
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=pem)
    return ctx
