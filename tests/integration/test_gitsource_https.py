"""The daemon following a config repository served over HTTPS (git's own ``git http-backend`` behind a
TLS server whose certificate a private CA signed, an access token checked as HTTP Basic), with
signatures required, running its real cycle against a real restore-point repository.

The story: the first signed commit is applied with the CA given as ``ca_file``; a pushed commit is
applied within the interval; an unsigned commit is refused and a signed one applied (trust works the
same over HTTPS); a rotated-away token is a fetch failure in the status that says what to do and never
shows the token, and the daemon recovers when the token is right again. Then the usual failures one by
one (wrong token, no credentials, unknown CA, nothing listening), and the token is looked for in every
git command's argv and environment, the logs, the status output and every file of the state directory.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from esxisim.gitserver import HttpsGitServer
from esxisim.sshd import free_port
from reconciler import cli
from reconciler.config.source import load_source
from reconciler.daemon import Daemon, Notifier
from reconciler.daemon.source import SourceTracker
from reconciler.gitsource.sync import Syncer
from reconciler.status.source import SourceStatus
from reconciler.status.store import StatusStore, status_path
from tests.integration.gitremote import (
    HOST_DOC,
    HOST_PASSWORD_ENV,
    ConfigRepo,
    Keys,
    make_points,
    policy_doc,
    repository_doc,
    source_doc,
)
from tests.reliability.secretscan import SecretScan
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("restore_logging")

WAIT = 90.0
USER = "reader"
TOKEN = f"glpat-{secrets.token_hex(16)}"
BASIC = base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()


wait_for = partial(wait_until, timeout=WAIT, poll=0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsGitServer]:
    with HttpsGitServer(tmp_path_factory.mktemp("https-git"), (USER, TOKEN)) as running:
        yield running


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    made = Keys.make(tmp_path_factory.mktemp("keys"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict[str, str]]]:
    """Every git command the product starts (argv and environment); they still run for real."""
    seen: list[tuple[list[str], dict[str, str]]] = []
    real = subprocess.Popen

    def spy(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        seen.append((list(argv), dict(kwargs.get("env") or {})))
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)  # git.py calls subprocess.Popen
    return seen


def token_file(directory: Path, token: str = TOKEN) -> Path:
    path = directory / "git-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def https_source(
    url: str,
    token: Path | None,
    *,
    ca_file: Path | None,
    signers: list[tuple[str, str, str]] = (),  # type: ignore[assignment]
) -> str:
    lines = []
    if token is not None:
        lines += [f"    username: {USER}", f"    token: {{file: {token}}}"]
    if ca_file is not None:
        lines.append(f"    ca_file: {ca_file}")
    block = "  https:\n" + "".join(f"{line}\n" for line in lines) if lines else ""
    return source_doc(url, interval="1s", ssh=block, signers=signers)


def source_status(state: Path) -> SourceStatus | None:
    if not status_path(state).exists():
        return None
    with StatusStore.open(status_path(state), readonly=True) as store:
        return store.source_status()


def test_the_daemon_follows_a_repository_over_https(
    server: HttpsGitServer,
    keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    commands: list[tuple[list[str], dict[str, str]]],
) -> None:
    monkeypatch.setenv(HOST_PASSWORD_ENV, "unused-password")
    bare = server.create("config")
    work = ConfigRepo(tmp_path / "work", f"file://{bare}", keys)  # the test pushes beside the server
    backups = tmp_path / "backups"
    make_points(backups, "web", 3)
    state = tmp_path / "state"
    token = token_file(tmp_path)

    def config(retention: str = "{keep_last: 10}") -> None:
        work.write("esxi/hosts.yaml", HOST_DOC)
        work.write("esxi/repository.yaml", repository_doc(backups))
        work.write("esxi/policies.yaml", policy_doc("web", retention=retention))

    def push(message: str, *, sign: str | None = "alice") -> str:
        commit = work.commit(message, sign=sign)
        work.push()
        return commit

    def status() -> SourceStatus:
        found = source_status(state)
        assert found is not None
        return found

    config()
    first = push("first")
    source_file = tmp_path / "source.yaml"
    signers = [("alice", "ssh", keys.ssh_public("alice"))]
    source_file.write_text(https_source(server.url("config"), token, ca_file=server.ca_file, signers=signers))
    tracker = SourceTracker(load_source(source_file), state)
    daemon = Daemon(tracker.config_dir, state, source=tracker, notifier=Notifier({}))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()

    def running(commit: str) -> bool:
        return daemon.desired is not None and daemon.desired.revision.id == f"git:{commit}"

    wrong = f"glpat-{secrets.token_hex(16)}"
    try:
        wait_for("the first commit applied", lambda: running(first))
        assert status().applied == first and status().applied_signer == "alice"
        assert status().url == server.url("config")

        config(retention="{keep_last: 11}")
        second = push("a pushed commit")
        wait_for("the pushed commit applied", lambda: running(second))

        unsigned = push("valid but unsigned", sign=None)
        wait_for("the unsigned commit refused", lambda: status().failed == unsigned)
        assert (status().failed_reason, status().failed_message) == ("SignatureRefused", "not signed")
        assert running(second)
        signed = push("the same, signed")
        wait_for("the signed commit applied", lambda: running(signed))

        token_file(tmp_path, wrong)  # the token is read on every fetch: a rotation needs no restart
        config(retention="{keep_last: 12}")
        unseen = push("pushed while the token is wrong")
        error = wait_for("the fetch failure in the status", lambda: status().fetch_error)
        assert error.startswith(f"fetching branch main from {server.url('config')}: ")
        assert (
            "(the server refused the credentials: check spec.https.username and that spec.https.token"
            in error
        )
        assert "\n" not in error and TOKEN not in error and wrong not in error
        assert running(signed) and status().fetched == signed
        with StatusStore.open(status_path(state), readonly=True) as store:
            (condition,) = [c for c in store.conditions() if c.kind == "source"]
        assert (condition.status, condition.reason) == ("Stalled", "FetchFailed")
        assert condition.message.endswith(f"{signed[:12]} stays applied") and TOKEN not in condition.message
        assert wrong not in condition.message

        token_file(tmp_path)
        wait_for("the daemon recovered", lambda: running(unseen))
        assert status().fetch_error is None
    finally:
        daemon.request_stop()
        thread.join(60)
    assert not thread.is_alive()
    assert not (state / "source" / "https" / "credentials").exists()  # only there while fetching

    logged = capsys.readouterr()
    assert cli.main(["status", "--state-dir", str(state), "--no-daemon"]) in (0, 1)
    text = capsys.readouterr()
    assert f"source: {server.url('config')} branch main" in text.out
    assert cli.main(["status", "--state-dir", str(state), "--no-daemon", "--json"]) in (0, 1)
    as_json = capsys.readouterr()
    doc = json.loads(as_json.out)
    assert doc["source"]["url"] == server.url("config") and doc["source"]["applied"] == unseen

    scan = SecretScan()
    scan.watch_source(source_file, state)  # the right token (the file holds it again)
    scan.secret(wrong, "the wrong HTTPS token")
    scan.secret(BASIC, "the HTTPS token as an Authorization: Basic value")
    for name, captured in (("the daemon's output", logged), ("status", text), ("status --json", as_json)):
        scan.output(captured.out + captured.err, name)
    scan.output("\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records), "log records")
    scan.output("\n".join(server.requests), "the server's request log")
    for argv, env in commands:
        scan.output(" ".join(argv) + "\n" + json.dumps(env), f"git command {argv[:3]}")
    assert any("fetch" in argv for argv, _env in commands)
    assert not scan.scan_directories()
    assert scan.scanned_files > 10
    assert not scan.findings, scan.findings
    scan.output(f"a log line holding {TOKEN}", "self-check")
    assert scan.findings  # the scan does find the token where it is


def test_https_failures_are_one_line_with_the_cause_and_the_fix(
    server: HttpsGitServer,
    tmp_path: Path,
    commands: list[tuple[list[str], dict[str, str]]],
) -> None:
    bare = server.create("failures")
    subprocess.run(["git", "--git-dir", str(bare), "symbolic-ref", "HEAD", "refs/heads/main"], check=True)
    url = server.url("failures")
    count = iter(range(100))

    def fetch(text: str, where: str = url) -> str:
        path = tmp_path / "source.yaml"
        path.write_text(text)
        syncer = Syncer(load_source(path), tmp_path / f"state{next(count)}")
        syncer.open()
        result = syncer.poll(None)
        assert result.reason == "FetchFailed", result
        assert "\n" not in result.message
        assert result.message.startswith(f"fetching branch main from {where}: ")
        return result.message

    wrong = f"glpat-{secrets.token_hex(16)}"
    refused = fetch(https_source(url, token_file(tmp_path, wrong), ca_file=server.ca_file))
    assert "Authentication failed" in refused and "the server refused the credentials" in refused
    assert wrong not in refused

    anonymous = fetch(https_source(url, None, ca_file=server.ca_file))
    assert "(the server wants credentials: give spec.https.username and spec.https.token)" in anonymous

    untrusted = fetch(https_source(url, token_file(tmp_path), ca_file=None))
    assert "server certificate verification failed" in untrusted
    assert "if it is signed by a private CA, give that CA's PEM file as spec.https.ca_file" in untrusted

    other_ca = tmp_path / "other-ca"
    from esxisim.gitserver import make_tls_files

    make_tls_files(other_ca)
    wrong_ca = fetch(https_source(url, token_file(tmp_path), ca_file=other_ca / "ca.pem"))
    assert "certificate" in wrong_ca and "spec.https.ca_file" in wrong_ca

    closed = f"https://127.0.0.1:{free_port()}/failures.git"
    unreachable = fetch(https_source(closed, token_file(tmp_path), ca_file=server.ca_file), closed)
    assert "Failed to connect" in unreachable
    assert "(check the URL's host and port and that the server is reachable from here)" in unreachable

    for argv, env in commands:
        assert not any(secret in " ".join(argv) for secret in (TOKEN, wrong, BASIC))
        assert not any(secret in value for value in env.values() for secret in (TOKEN, wrong, BASIC))
        assert not any(key.startswith(("GIT_SSL_NO_VERIFY", "GIT_ASKPASS")) for key in env)
        assert "http.sslVerify=false" not in argv
    for state in tmp_path.glob("state*"):
        assert not (state / "source" / "https" / "credentials").exists()
        assert TOKEN not in (state / "source" / "repo.git" / "config").read_text()
