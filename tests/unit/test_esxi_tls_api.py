"""TLS pin checks, the licence rule and fault mapping (no host needed)."""

from __future__ import annotations

import datetime
import hashlib
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyVmomi import vim, vmodl

from reconciler.esxi.api import mapped_faults, wait_task
from reconciler.esxi.errors import (
    ApiError,
    NotPinnedError,
    PinMismatchError,
    RestrictedByLicenseError,
    TaskTimeoutError,
)
from reconciler.esxi.licence import license_kind_from_editions
from reconciler.esxi.tls import check_pin, format_thumbprint, parse_thumbprint, pinned_context


def self_signed() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esxi.local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_thumbprints() -> None:
    pem = self_signed()
    der = ssl.PEM_cert_to_DER_cert(pem)
    sha1, sha256 = (
        format_thumbprint(hashlib.sha1(der).digest()),
        format_thumbprint(hashlib.sha256(der).digest()),
    )
    for pin in (sha1, sha256, sha256.replace(":", "").lower()):
        check_pin(pem, pin)
    assert parse_thumbprint(sha1)[0] == "sha1" and parse_thumbprint(sha256)[0] == "sha256"
    other = format_thumbprint(hashlib.sha256(b"other").digest())
    with pytest.raises(PinMismatchError, match="not the pinned"):
        check_pin(pem, other)
    for bad in ("", "AA:BB", "ZZ" * 32, sha256 + ":00"):
        with pytest.raises(ValueError):
            parse_thumbprint(bad)
    with pytest.raises(NotPinnedError):
        pinned_context("127.0.0.1", 9, None)


def test_licence_rule() -> None:
    assert license_kind_from_editions(["esx.hypervisor.cpuPackageCoreLimited"]) == "free"
    assert license_kind_from_editions(["esx.hypervisor.cpuPackage", "esx.free.x"]) == "free"
    assert license_kind_from_editions(["eval"]) == "licensed"
    assert license_kind_from_editions(["esx.enterprisePlus.cpuPackage"]) == "licensed"
    assert license_kind_from_editions(["esx.hypervisor.cpuPackage", "esx.standard.cpuPackage"]) == "licensed"
    assert license_kind_from_editions([]) == "licensed"


def test_fault_mapping() -> None:
    with pytest.raises(RestrictedByLicenseError) as err, mapped_faults("snap"):
        raise vim.fault.RestrictedVersion(msg="Current license or ESXi version prohibits execution")  # type: ignore[no-untyped-call]
    assert "prohibits" in str(err.value) and isinstance(err.value.__cause__, vim.fault.RestrictedVersion)
    with pytest.raises(ApiError) as err2, mapped_faults("qcda"):
        raise vmodl.fault.InvalidArgument(invalidProperty="changeId")  # type: ignore[no-untyped-call]
    assert not isinstance(err2.value, RestrictedByLicenseError)
    assert isinstance(err2.value.__cause__, vmodl.fault.InvalidArgument)
    with pytest.raises(KeyError), mapped_faults("other"):
        raise KeyError("not a fault: untouched")


class FakeTask:
    def __init__(self, states: list[str]) -> None:
        self.states = states

    @property
    def info(self) -> object:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return type("Info", (), {"state": state, "result": "done", "error": None})()


def test_wait_task_polls_and_times_out() -> None:
    assert wait_task(FakeTask(["queued", "running", "success"]), 5, "t") == "done"
    with pytest.raises(TaskTimeoutError, match="still running"):
        wait_task(FakeTask(["running"]), 0.3, "t")
