"""Notifications reach real local servers through apprise: e-mail (aiosmtpd: plain SMTP, STARTTLS and TLS
with a password given as a secret and a certificate the client verifies) and an HTTP receiver standing
in for ntfy, Gotify and a JSON webhook. What arrived is checked (subject, body, token used), the secret
is nowhere it must not be, a service that is down is retried, and a full queue never blocks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.config import load_config
from reconciler.config.model import Notifier
from reconciler.notify.rules import Message, message_for_test
from reconciler.notify.send import Dispatcher, SendResult, send_once
from reconciler.status.store import StatusStore, status_path
from tests.notifyservers import HttpReceiver, http_receiver, make_certificate, smtp_server
from tests.unit.test_cli_outcomes import check

SMTP_PASSWORD = "s3cret-Pa55/word+&?#%="
TOKEN = "AbCdEf0123456789-gotify"


def notifier(tmp_path: Path, url: str, secrets: str = "", extra: str = "", name: str = "n") -> Notifier:
    config = tmp_path / f"config-{name}"
    config.mkdir(exist_ok=True)
    (config / "notifier.yaml").write_text(
        f"apiVersion: esxi-reconciler/v1\nkind: Notifier\nmetadata: {{name: {name}}}\nspec:\n"
        f"  url: {url!r}\n{secrets}{extra}"
    )
    return load_config(config).notifiers[name]


def message(
    text: str = "VM esxi1/web01: backup failed: host esxi1: connection refused\nsecond line",
) -> Message:
    return Message(
        "n", "alert", "[esxi-reconciler] Backup failed: VM esxi1/web01", text, "failure", ("backup-failed",)
    )


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)
    monkeypatch.setenv("GOTIFY_TOKEN", TOKEN)


@pytest.fixture
def trusted_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    cert = make_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    return cert


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with http_receiver() as r:
        yield r


def test_json_webhook_ntfy_and_gotify_receive_the_message(
    tmp_path: Path, receiver: HttpReceiver, secrets_env: None
) -> None:
    base = f"127.0.0.1:{receiver.port}"
    webhook = notifier(tmp_path, f"json://{base}/hooks/esxi", name="webhook")
    ntfy = notifier(tmp_path, f"ntfy://{base}/esxi-backups", name="ntfy")
    gotify = notifier(
        tmp_path, f"gotify://{base}/{{token}}", "  secrets: {token: {env: GOTIFY_TOKEN}}\n", name="gotify"
    )
    for n in (webhook, ntfy, gotify):
        result = send_once(n, message())
        assert result.ok, result.error
    hook, topic, push = receiver.wait_for(3)
    assert hook.path == "/hooks/esxi"
    assert hook.json()["title"] == "[esxi-reconciler] Backup failed: VM esxi1/web01"
    assert "connection refused" in hook.json()["message"] and hook.json()["type"] == "failure"
    assert topic.json()["topic"] == "esxi-backups" and "web01" in topic.json()["message"]
    assert push.path == "/message" and push.headers["x-gotify-key"] == TOKEN
    assert "web01" in push.json()["message"]


def test_a_refused_token_is_reported_without_it(
    tmp_path: Path, receiver: HttpReceiver, secrets_env: None
) -> None:
    gotify = notifier(
        tmp_path,
        f"gotify://127.0.0.1:{receiver.port}/{{token}}",
        "  secrets: {token: {env: GOTIFY_TOKEN}}\n",
    )
    receiver.fail_next(1, status=401)
    result = send_once(gotify, message())
    assert not result.ok and result.error
    assert TOKEN not in result.error
    assert "Gotify" in result.error and "401" in result.error, result.error


def test_mail_over_starttls_with_a_password_secret(
    tmp_path: Path, trusted_certificate: tuple[Path, Path], secrets_env: None
) -> None:
    with smtp_server(certificate=trusted_certificate, tls="starttls", password=SMTP_PASSWORD) as smtp:
        mail = notifier(
            tmp_path,
            f"mailtos://backup:{{password}}@127.0.0.1:{smtp.port}?from=backup@example.org&to=ops@example.org",
            "  secrets: {password: {env: SMTP_PASSWORD}}\n",
        )
        result = send_once(mail, message())
        assert result.ok, result.error
        (got,) = smtp.wait_for(1)
    assert got.authenticated_as == "backup"
    assert got.recipients == ["ops@example.org"] and got.sender == "backup@example.org"
    assert got.subject == "[esxi-reconciler] Backup failed: VM esxi1/web01"
    assert "host esxi1: connection refused" in got.body
    assert got.message.get_content_type() == "text/plain" and "\r\nsecond line\r\n" in got.body
    assert SMTP_PASSWORD.encode() not in got.raw


def test_mail_over_implicit_tls(
    tmp_path: Path, trusted_certificate: tuple[Path, Path], secrets_env: None
) -> None:
    with smtp_server(certificate=trusted_certificate, tls="implicit", password=SMTP_PASSWORD) as smtp:
        mail = notifier(
            tmp_path,
            f"mailtos://backup:{{password}}@127.0.0.1:{smtp.port}?mode=ssl&from=backup@example.org"
            "&to=ops@example.org",
            "  secrets: {password: {env: SMTP_PASSWORD}}\n",
        )
        result = send_once(mail, message())
        assert result.ok, result.error
        (got,) = smtp.wait_for(1)
    assert got.authenticated_as == "backup" and "web01" in got.subject


def test_plain_mail_and_a_wrong_password_named_without_it(
    tmp_path: Path, trusted_certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with smtp_server() as plain:
        mail = notifier(tmp_path, f"mailto://127.0.0.1:{plain.port}?from=b@example.org&to=ops@example.org")
        assert send_once(mail, message()).ok
        assert plain.wait_for(1)[0].subject.endswith("VM esxi1/web01")
    wrong = "not-the-Password-42"
    monkeypatch.setenv("SMTP_PASSWORD", wrong)
    with smtp_server(certificate=trusted_certificate, tls="starttls", password=SMTP_PASSWORD) as smtp:
        mail = notifier(
            tmp_path,
            f"mailtos://backup:{{password}}@127.0.0.1:{smtp.port}?from=b@example.org&to=ops@example.org",
            "  secrets: {password: {env: SMTP_PASSWORD}}\n",
            name="m2",
        )
        result = send_once(mail, message())
    assert not result.ok and result.error and smtp.mails == []
    assert wrong not in result.error and "not-the-Password" not in result.error


def test_notify_test_verb_sends_and_records(
    tmp_path: Path, receiver: HttpReceiver, capsys: pytest.CaptureFixture[str], secrets_env: None
) -> None:
    notifier(
        tmp_path,
        f"gotify://127.0.0.1:{receiver.port}/{{token}}",
        "  secrets: {token: {env: GOTIFY_TOKEN}}\n",
        name="phone",
    )
    config, state = tmp_path / "config-phone", tmp_path / "state"
    assert main(["--config", str(config), "--state-dir", str(state), "notify", "test", "phone"]) == 0
    (got,) = receiver.wait_for(1)
    assert got.json()["title"] == "[esxi-reconciler] Test message from notifier phone"
    out = capsys.readouterr().out
    assert "sent a test message through phone" in out and TOKEN not in out
    receiver.fail_next(1, status=500)
    assert main(["--config", str(config), "--state-dir", str(state), "notify", "test", "phone"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("esxi-reconciler notify test: notifier phone: not sent:") and TOKEN not in err
    argv = ["--config", str(config), "--state-dir", str(state), "notify", "test", "phone", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    check("notify-test", doc)
    assert (doc["notifier"], doc["url"], doc["attempts"]) == (
        "phone",
        f"gotify://127.0.0.1:{receiver.port}/{{token}}",
        1,
    )
    receiver.fail_next(1, status=401)
    assert main(argv) == 1
    error = json.loads(capsys.readouterr().out)
    check("error", error)
    assert error["error"]["code"] == "notify-failed" and TOKEN not in json.dumps(error)
    with StatusStore.open(status_path(state), readonly=True) as store:
        events = store.events.events()
    assert [(e.kind, e.subject, e.outcome) for e in events] == [
        ("notify", "phone", "failed"),
        ("notify", "phone", "ok"),
        ("notify", "phone", "failed"),
        ("notify", "phone", "ok"),
    ]
    assert all(TOKEN not in e.message and TOKEN not in str(e.detail) for e in events)
    assert (state / "status.db").read_bytes().find(TOKEN.encode()) == -1


def test_notify_test_names_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notifier(tmp_path, "gotify://127.0.0.1:1/{token}", "  secrets: {token: {env: NO_SUCH_VARIABLE_HERE}}\n")
    config = str(tmp_path / "config-n")
    assert main(["--config", config, "notify", "test", "nn"]) == 64
    assert "no Notifier named 'nn'; did you mean 'n'?" in capsys.readouterr().err
    assert main(["--config", config, "notify", "test", "n"]) == 78
    assert "NO_SUCH_VARIABLE_HERE is not set" in capsys.readouterr().err
    notifier(tmp_path, "nosuchservice://x/y", name="odd")
    assert main(["--config", str(tmp_path / "config-odd"), "notify", "test", "odd"]) == 78
    assert "apprise does not understand the URL (scheme nosuchservice://)" in capsys.readouterr().err
    # validate knows the scheme is wrong: a warning (the daemon loads it too, and logs notify.unusable)
    assert main(["--config", str(tmp_path / "config-odd"), "validate"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: notifier.yaml:1:1 spec.url: apprise does not understand the URL (scheme")
    assert main(["--config", str(tmp_path / "config-odd"), "validate", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    check("validate", doc)
    assert [w["path"] for w in doc["warnings"]] == ["spec.url"]
    # a known scheme, its secret not set: validate reads no secret (--resolve-secrets does), no warning
    assert main(["--config", str(tmp_path / "config-n"), "validate"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_service_down_for_a_while_is_retried(tmp_path: Path, receiver: HttpReceiver) -> None:
    hook = notifier(tmp_path, f"json://127.0.0.1:{receiver.port}/hook")
    results: list[SendResult] = []
    receiver.fail_next(2)
    dispatcher = Dispatcher(lambda n, m, r: results.append(r), delays=(0.1, 0.1, 0.1))
    dispatcher.start()
    try:
        assert dispatcher.submit(hook, message())
        assert dispatcher.wait_idle(30)
    finally:
        dispatcher.stop()
    assert len(receiver.wait_for(1)) == 1
    (result,) = results
    assert result.ok and result.attempts == 3


def test_sending_never_blocks_and_a_full_queue_drops_with_a_record(tmp_path: Path) -> None:
    hook = notifier(tmp_path, "json://127.0.0.1:1/hook")
    release = threading.Event()

    def slow(n: Notifier, m: Message) -> SendResult:
        release.wait(30)
        return SendResult(True)

    results: list[tuple[str, SendResult]] = []
    dispatcher = Dispatcher(lambda n, m, r: results.append((m.title, r)), send=slow, delays=(), size=1)
    dispatcher.start()
    try:
        started = time.monotonic()
        accepted = [dispatcher.submit(hook, message_for_test(f"n{i}", _now())) for i in range(4)]
        assert time.monotonic() - started < 1.0  # a hung service does not hold the daemon
        assert accepted[0] and not all(accepted)
        dropped = [r for _, r in results if not r.ok]
        assert dropped and all(r.error == "not sent: the send queue is full" for r in dropped)
        release.set()
        assert dispatcher.wait_idle(30)
    finally:
        dispatcher.stop()
    assert sum(r.ok for _, r in results) == sum(accepted)


def test_a_notifier_that_hangs_never_holds_up_another(tmp_path: Path, receiver: HttpReceiver) -> None:
    """A service that hangs (or waits minutes between retries) delays only its own messages."""
    stuck = notifier(tmp_path, "json://127.0.0.1:1/stuck", name="stuck")
    hook = notifier(tmp_path, f"json://127.0.0.1:{receiver.port}/hook", name="hook")
    release = threading.Event()

    def send(n: Notifier, m: Message) -> SendResult:
        if n.name == "stuck":
            release.wait(60)
            return SendResult(False, "the service hung", 1)
        return send_once(n, m)

    results: list[tuple[str, SendResult]] = []
    dispatcher = Dispatcher(lambda n, m, r: results.append((n.name, r)), send=send, delays=(60.0,))
    dispatcher.start()
    try:
        assert dispatcher.submit(stuck, message())
        assert dispatcher.submit(hook, message())
        (got,) = receiver.wait_for(1)  # while "stuck" still hangs in its first attempt
        assert got.json()["title"] == "[esxi-reconciler] Backup failed: VM esxi1/web01"
        deadline = time.monotonic() + 30
        while not results and time.monotonic() < deadline:  # the result is reported after the request
            time.sleep(0.05)
        assert not release.is_set() and [name for name, _ in results] == ["hook"]
        release.set()
    finally:
        dispatcher.stop(timeout=30)
    assert [(name, r.ok, r.attempts) for name, r in results] == [("hook", True, 1), ("stuck", False, 1)]


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.mark.usefixtures("restore_logging")
def test_a_daemon_started_with_an_invalid_config_tells_through_its_valid_notifiers(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    from reconciler.daemon import Daemon
    from reconciler.daemon.notify import Notifier as SystemdNotifier

    config = tmp_path / "config"
    config.mkdir()
    (config / "notifier.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: Notifier\nmetadata: {name: hook}\n"
        f"spec: {{url: 'json://127.0.0.1:{receiver.port}/hook'}}\n"
    )
    broken = config / "policy.yaml"
    broken.write_text(
        "apiVersion: esxi-reconciler/v1\nkind: BackupPolicy\nmetadata: {name: p}\n"
        "spec: {host: esxi9, repository: r, vms: {all: true}, schedule: {every: 1h},\n"
        "  retention: {keep_last: 1}}\n"
    )
    daemon = Daemon(config, tmp_path / "state", resync=0.5, notifier=SystemdNotifier({}), watch=False)
    thread = threading.Thread(target=daemon.run, name="daemon")
    thread.start()
    try:
        (rejected,) = receiver.wait_for(1)
        assert rejected.json()["title"] == "[esxi-reconciler] Config rejected: the config"
        assert "policy.yaml:4:" in rejected.json()["message"] and "esxi9" in rejected.json()["message"]
        broken.unlink()
        daemon.request_reload()
        (_, fixed) = receiver.wait_for(2)
        assert fixed.json()["title"] == "[esxi-reconciler] Recovered: the config"
        time.sleep(1.5)  # cycles with the valid config: nothing more to say
        assert len(receiver.requests) == 2
    finally:
        daemon.request_stop()
        thread.join(60)
    with StatusStore.open(status_path(tmp_path / "state"), readonly=True) as store:
        kinds = [(e.kind, e.outcome) for e in store.events.events()]
    assert ("config", "failed") in kinds and ("config", "info") in kinds
    assert kinds.count(("notify", "ok")) == 2 and ("daemon", "info") in kinds
