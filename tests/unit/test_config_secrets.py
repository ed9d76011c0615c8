"""Secrets by reference: resolved lazily, refused when exposed, and never shown anywhere."""

from __future__ import annotations

import os
import pickle
import textwrap
from pathlib import Path

import pytest

from reconciler.config import ConfigError, Secret, SecretError, load_config

VALUE = "hunter2-Sup3rS3cret"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(VALUE + "\n")
    path.chmod(0o600)
    return path


def test_repr_and_str_show_only_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESXI1_PASSWORD", VALUE)
    secret = Secret("env", "ESXI1_PASSWORD")
    assert repr(secret) == str(secret) == f"{secret}" == "Secret(env:ESXI1_PASSWORD)"
    assert secret.reveal() == VALUE
    # The value is read on demand and never kept on the object.
    assert VALUE not in repr(vars(secret) if hasattr(secret, "__dict__") else secret)
    assert VALUE.encode() not in pickle.dumps(secret)


def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", VALUE)
    assert Secret("env", "PW").reveal() == VALUE
    monkeypatch.delenv("PW")
    with pytest.raises(SecretError, match=r"^Secret\(env:PW\): environment variable PW is not set$"):
        Secret("env", "PW").reveal()
    monkeypatch.setenv("PW", "")
    with pytest.raises(SecretError, match=r"^Secret\(env:PW\): the secret is empty$"):
        Secret("env", "PW").reveal()


def test_file_strips_one_newline(secret_file: Path) -> None:
    assert Secret("file", str(secret_file)).reveal() == VALUE
    secret_file.write_bytes(b"key with spaces  \r\n")
    assert Secret("file", str(secret_file)).reveal() == "key with spaces  "
    secret_file.write_bytes(b"\x00\x01binary")
    assert Secret("file", str(secret_file)).reveal_bytes() == b"\x00\x01binary"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620])
def test_file_readable_by_others_is_refused(secret_file: Path, mode: int) -> None:
    secret_file.chmod(mode)
    with pytest.raises(SecretError) as caught:
        Secret("file", str(secret_file)).reveal()
    assert str(caught.value) == (
        f"Secret(file:{secret_file}): {secret_file} is readable or writable by group or others (mode"
        f" {mode:04o}); run: chmod 600 {secret_file}"
    )
    assert VALUE not in str(caught.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_file_modes_are_accepted(secret_file: Path, mode: int) -> None:
    secret_file.chmod(mode)
    assert Secret("file", str(secret_file)).reveal() == VALUE


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match=r"^Secret\(file:.*/nope\): cannot read .*/nope: No such file"):
        Secret("file", str(tmp_path / "nope")).reveal()
    with pytest.raises(SecretError, match="is not a regular file"):
        Secret("file", str(tmp_path)).reveal()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretError, match="is not a regular file"):  # and does not hang
        Secret("file", str(fifo)).reveal()


def test_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(SecretError) as caught:
        Secret("credential", "esxi1-password").reveal()
    assert str(caught.value) == (
        "Secret(credential:esxi1-password): $CREDENTIALS_DIRECTORY is not set; run under systemd with"
        " LoadCredential=esxi1-password:/path/to/file, or use {file: /path} instead"
    )
    (tmp_path / "esxi1-password").write_text(VALUE + "\n")
    (tmp_path / "esxi1-password").chmod(0o440)  # systemd's own mode; not checked for credentials
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert Secret("credential", "esxi1-password").reveal() == VALUE
    with pytest.raises(SecretError, match=r"^Secret\(credential:other\): cannot read"):
        Secret("credential", "other").reveal()


def test_not_utf8(secret_file: Path) -> None:
    secret_file.write_bytes(b"\xff\xfe" + VALUE.encode())
    with pytest.raises(SecretError) as caught:
        Secret("file", str(secret_file)).reveal()
    assert str(caught.value) == f"Secret(file:{secret_file}): the secret is not valid UTF-8 text"
    assert caught.value.__suppress_context__  # the decode error (which holds the bytes) is not chained


HOST = """\
apiVersion: esxi-reconciler/v1
kind: Host
metadata: {name: esxi1}
spec:
  address: esxi1.lan
  credentials:
    user: root
    password: <PASSWORD>
  api: {insecure_skip_tls_verify: true}
  ssh:
    insecure_skip_host_key_check: true
    private_key: {env: ESXI1_SSH_KEY}
---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {name: nas}
spec:
  backend: {type: local, path: /srv/b}
  encryption: {enabled: true, key: <KEY>}
"""


def write_config(root: Path, password: str, key: str) -> Path:
    (root / "c.yaml").write_text(textwrap.dedent(HOST).replace("<PASSWORD>", password).replace("<KEY>", key))
    return root


def test_plaintext_secrets_are_errors_that_never_echo_the_value(tmp_path: Path) -> None:
    write_config(tmp_path, VALUE, f'"{VALUE}"')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    howto = (
        "plaintext secrets are not allowed in the config; reference it instead: {env: NAME} (environment"
        " variable), {file: /absolute/path} (a file only its owner can read: chmod 600) or {credential: NAME}"
        " (systemd LoadCredential=NAME:/path)"
    )
    assert [str(i) for i in caught.value.issues] == [
        f"c.yaml:8:5 spec.credentials.password: {howto}",
        f"c.yaml:19:31 spec.encryption.key: {howto}",
    ]
    assert VALUE not in str(caught.value)
    assert VALUE not in repr(caught.value.issues)


@pytest.mark.parametrize(
    "wrong",
    [
        f"[{VALUE}]",  # a list holding the value
        f"{{value: {VALUE}}}",  # an unknown key holding the value
        f"{{env: {VALUE}, file: /x}}",  # two sources
        f"{{env: '{VALUE} x'}}",  # not a variable name
        f"{{file: {VALUE}}}",  # not an absolute path
    ],
)
def test_no_schema_message_about_a_secret_shows_its_content(tmp_path: Path, wrong: str) -> None:
    write_config(tmp_path, wrong, "{env: K}")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.issues, "the wrong secret must be reported"
    assert VALUE not in str(caught.value)


def test_secret_references_load_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation does not need the secrets to exist; ``resolve_secrets`` checks each, by reference."""
    monkeypatch.delenv("ESXI1_SSH_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(VALUE)
    key_file.chmod(0o644)
    config = tmp_path / "config"
    config.mkdir()
    write_config(config, "{credential: esxi1-password}", f"{{file: {key_file}}}")
    desired = load_config(config)
    host = desired.host("esxi1")
    assert host.credentials.password == Secret("credential", "esxi1-password")
    assert host.ssh.private_key == Secret("env", "ESXI1_SSH_KEY")
    assert desired.repository("nas").encryption.key == Secret("file", str(key_file))
    assert VALUE not in repr(desired)

    with pytest.raises(ConfigError) as caught:
        load_config(config, resolve_secrets=True)
    assert [str(i) for i in caught.value.issues] == [
        "c.yaml:8:5 spec.credentials.password: Secret(credential:esxi1-password): $CREDENTIALS_DIRECTORY is"
        " not set; run under systemd with LoadCredential=esxi1-password:/path/to/file, or use {file: /path}"
        " instead",
        "c.yaml:12:5 spec.ssh.private_key: Secret(env:ESXI1_SSH_KEY): environment variable ESXI1_SSH_KEY is"
        " not set",
        f"c.yaml:19:31 spec.encryption.key: Secret(file:{key_file}): {key_file} is readable or writable by"
        f" group or others (mode 0644); run: chmod 600 {key_file}",
    ]
    assert VALUE not in str(caught.value)

    key_file.chmod(0o600)
    monkeypatch.setenv("ESXI1_SSH_KEY", VALUE)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "esxi1-password").write_text(VALUE)
    desired = load_config(config, resolve_secrets=True)
    assert desired.host("esxi1").credentials.password.reveal() == VALUE
    assert VALUE not in repr(desired) and VALUE not in str(desired.host("esxi1"))


def test_secret_is_immutable_and_compares_by_reference() -> None:
    secret = Secret("env", "A")
    with pytest.raises(AttributeError):
        secret.name = "B"  # type: ignore[misc]
    assert secret == Secret("env", "A") != Secret("file", "A")
    assert Secret.from_reference({"file": "/etc/x"}) == Secret("file", "/etc/x")
