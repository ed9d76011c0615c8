"""Config failures, through the real daemon (``esxi-reconciler run`` as a process, against the lab): a
merge left conflict markers, editor swap files, a file written in parts or renamed into place, a YAML
bomb, a 50 MB file, duplicate keys, a secret file with a loose mode. Each bad change is reported with
its file and line (the ``config.invalid`` log event and the ``config`` condition that ``status``
shows), names the cause, and the daemon keeps running the last good config; what is not config (swap
files, a file still being written) is never read as config.

The config has notifiers with secrets (an SMTP password, a wrong one, a Gotify token) sending to local
servers: every rejection is told, and the secret scan proves none of their secrets is in the daemon's
log, ``notify test``'s output, ``history`` or the status file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from esxisim.handle import LabHandle
from reconciler.cli import main
from reconciler.config import load_config
from reconciler.config.documents import parse_text
from reconciler.repository import KdfParams, Repository
from reconciler.status.conditions import CONFIG_NAME
from reconciler.status.store import StatusStore, status_path
from tests.integration.labconfig import PASSPHRASE, policy_yaml, private_file, write_lab_config
from tests.notifyservers import HttpReceiver, Mail, SmtpServer, http_receiver, smtp_server
from tests.reliability.fuzz import bounded
from tests.reliability.ledger import Ledger
from tests.reliability.secretscan import SecretScan

pytestmark = [pytest.mark.lab]

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0
DEBOUNCE = 1.0
RESYNC = 2.0
MAX_RSS_MIB = 400
SMTP_PASSWORD = "n0tify/Pa55+w&rd?#%"
WRONG_PASSWORD = "wr0ng/Pa55+w&rd?#%"
GOTIFY_TOKEN = "Gx7-notify-token-4f9a2c"
"""The daemon's resident memory after reading a YAML bomb and a 50 MB file (it holds about 100 MiB)."""


@dataclass
class Daemon:
    """``esxi-reconciler run`` as a process; its JSON log lines are collected as they come."""

    proc: subprocess.Popen[bytes]
    scan: SecretScan
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.scan.output(raw, "daemon stderr")
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "(not JSON)", "text": raw.decode(errors="replace")}
            with self.lock:
                self.events.append(event)

    def mark(self) -> int:
        with self.lock:
            return len(self.events)

    def since(self, mark: int, name: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events[mark:] if name is None or e.get("event") == name]

    def wait(self, mark: int, what: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for event in self.since(mark):
                if check(event):
                    return event
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) before {what}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; events: {self.since(mark)[-20:]}")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@dataclass
class Env:
    config: Path
    state: Path
    secrets: Path
    daemon: Daemon
    good: str
    """The revision of the good config."""
    policies: int
    smtp: SmtpServer
    receiver: HttpReceiver


def notifiers_yaml(secrets: Path, smtp: SmtpServer, receiver: HttpReceiver) -> str:
    """Three notifiers with secrets by reference: mail (right password), mail with a wrong password (every
    send fails, its error logged), Gotify (the token in the URL, sent as a header)."""
    mail = f"mailto://backup:{{password}}@127.0.0.1:{smtp.port}?from=backup@example.org&to=ops@example.org"
    docs = []
    for name, url, secret, value in (
        ("ops-mail", mail, "password", SMTP_PASSWORD),
        ("ops-mail-wrong", mail, "password", WRONG_PASSWORD),
        ("ops-phone", f"gotify://127.0.0.1:{receiver.port}/{{token}}", "token", GOTIFY_TOKEN),
    ):
        file = private_file(secrets / f"{name}.secret", value)
        docs.append(
            f"apiVersion: esxi-reconciler/v1\nkind: Notifier\nmetadata: {{name: {name}}}\nspec:\n"
            f"  url: '{url}'\n  secrets: {{{secret}: {{file: {file}}}}}\n"
            "  rate_limit: {messages: 1000, per: 1h}\n"
        )
    return "---\n".join(docs)


@pytest.fixture(scope="module")
def env(lab: LabHandle, tmp_path_factory: pytest.TempPathFactory, secret_scan: SecretScan) -> Iterator[Env]:
    with smtp_server(password=SMTP_PASSWORD) as smtp, http_receiver() as receiver:
        yield from _env(lab, tmp_path_factory, secret_scan, smtp, receiver)


def _env(
    lab: LabHandle,
    tmp_path_factory: pytest.TempPathFactory,
    secret_scan: SecretScan,
    smtp: SmtpServer,
    receiver: HttpReceiver,
) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("config-failures")
    # manual schedules: cycles observe and plan, nothing runs on the shared lab
    policies = policy_yaml("p", lab.free, ["web01"], schedule="{manual: true}")
    config = write_lab_config(lab, root, policies)
    (config / "notifiers.yaml").write_text(notifiers_yaml(root / "secrets", smtp, receiver))
    Repository.init(root / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    state = root / "state"
    secret_scan.watch_config(config, state)
    desired = load_config(config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.cli", "--config", str(config), "--state-dir", str(state),
         "--log-format", "json", "--log-level", "debug",  # config.unchanged and cycle.start are debug
         "run", "--resync", f"{RESYNC:.0f}s", "--debounce", f"{DEBOUNCE:.0f}s"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    daemon = Daemon(proc, secret_scan)
    reader = threading.Thread(target=daemon.read, name="daemon-stderr", daemon=True)
    reader.start()
    try:
        daemon.wait(0, "the first cycle", lambda e: e.get("event") == "cycle.done")
        yield Env(
            config,
            state,
            root / "secrets",
            daemon,
            desired.revision.id,
            len(desired.policies),
            smtp,
            receiver,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(timeout=10)
    assert proc.returncode == 0, daemon.since(0)[-20:]


def config_files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.parts}


@pytest.fixture(autouse=True)
def config_put_back(env: Env) -> Iterator[None]:
    """Each case leaves the config as it found it, even when it fails: a case that fails half-way would
    otherwise leave its change in force, and every later case would fail on a config that is no longer
    the good one (CI once turned one failure into six this way)."""
    before = config_files(env.config)
    yield
    after = config_files(env.config)
    if after == before:
        return
    mark = env.daemon.mark()
    for path in after.keys() - before.keys():
        path.unlink()
    for path, content in before.items():
        if after.get(path) != content:
            path.write_bytes(content)
    back_to_good(env, mark)


def config_condition(env: Env, status: str) -> Any:
    """The ``config`` condition once it has ``status`` (the daemon logs before it writes the store)."""
    deadline = time.monotonic() + WAIT
    while True:
        with StatusStore.open(status_path(env.state), readonly=True) as store:
            condition = {c.key: c for c in store.conditions()}[("config", CONFIG_NAME)]
        if condition.status == status or time.monotonic() > deadline:
            return condition
        time.sleep(0.05)


def rejected(env: Env, mark: int, file: str, line: int, cause: str) -> dict[str, Any]:
    """Wait for the rejection of a bad change: the issue at ``file:line`` naming ``cause``, the last good
    config kept, the ``config`` condition saying the same, and a cycle run afterwards under the good
    revision. Returns the issue's log event."""
    issue = env.daemon.wait(
        mark,
        f"config.invalid at {file}:{line}",
        lambda e: e.get("event") == "config.invalid" and e.get("file") == file,
    )
    assert (issue["line"], cause in issue["message"]) == (line, True), issue
    verdict = env.daemon.wait(mark, "config.rejected", lambda e: e.get("event") == "config.rejected")
    assert verdict["running_revision"] == env.good and verdict["action"] == "keeping the last good config"
    condition = config_condition(env, "Stalled")
    assert condition.status == "Stalled", condition
    assert f"{file}:{line}" in condition.message and cause in condition.message, condition
    after = env.daemon.mark()
    cycle = env.daemon.wait(after, "a cycle after the rejection", lambda e: e.get("event") == "cycle.start")
    assert cycle["revision"] == env.good
    return issue


def back_to_good(env: Env, mark: int) -> None:
    env.daemon.wait(
        mark,
        "the good config again",
        lambda e: e.get("event") in ("config.loaded", "config.unchanged") and e.get("revision") == env.good,
    )
    assert config_condition(env, "Ready").status == "Ready"


# -- the cases -----------------------------------------------------------------------------------------


def test_merge_conflict_markers(env: Env, ledger: Ledger) -> None:
    path = env.config / "policies" / "p.yaml"
    good = path.read_text()
    lines = good.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("schedule:"))
    ours, theirs = (
        ["<<<<<<< HEAD\n", lines[at]],
        ["=======\n", "  schedule: {every: 1h}\n", ">>>>>>> nightly\n"],
    )
    conflicted = [*lines[:at], *ours, *theirs, *lines[at + 1 :]]
    mark = env.daemon.mark()
    path.write_text("".join(conflicted))
    rejected(env, mark, "policies/p.yaml", at + 1, "unresolved merge conflict")
    ledger.count("faults_injected")
    mark = env.daemon.mark()
    path.write_text(good)
    back_to_good(env, mark)


def test_editor_swap_and_backup_files_are_not_config(env: Env, ledger: Ledger) -> None:
    """vim's ``.p.yaml.swp`` and ``4913``, a ``p.yaml~`` backup, emacs' ``.#p.yaml`` lock: events that
    lead to a reload, which reads none of them."""
    policies = env.config / "policies"
    good = (policies / "p.yaml").read_text()
    made = [policies / ".p.yaml.swp", policies / "p.yaml~", policies / "4913", policies / ".#p.yaml"]
    mark = env.daemon.mark()
    made[0].write_bytes(b"b0VIM 9.0\x00\x00\x00" + os.urandom(4000))
    made[1].write_text(good.replace("manual: true", "every: 1h") + "  colour: blue\n")
    made[2].write_bytes(b"")
    made[3].symlink_to("root@host.1234:1700000000")
    event = env.daemon.wait(
        mark, "a reload", lambda e: e.get("event") in ("config.unchanged", "config.loaded")
    )
    assert event["event"] == "config.unchanged" and event["revision"] == env.good
    assert env.daemon.since(mark, "config.invalid") == []
    ledger.count("faults_injected", len(made))
    for path in made:
        path.unlink()


def test_a_file_written_in_parts_is_read_only_when_complete(env: Env, ledger: Ledger) -> None:
    """A policy file written in two parts with a pause longer than the debounce and the resync: its first
    part alone is a valid config (one policy of two), which the daemon must never load. Then an atomic
    save: a temporary file written in parts and renamed into place."""
    first = policy_yaml("q1", "esxi1", ["web01"], schedule="{manual: true}")
    second = policy_yaml("q2", "esxi1", ["db 01"], schedule="{manual: true}")
    path = env.config / "policies" / "q.yaml"
    mark = env.daemon.mark()
    with path.open("w") as f:
        f.write(first)
        f.flush()
        time.sleep(3 * (DEBOUNCE + RESYNC))  # quiet far longer than the debounce, resyncs due
        # the first part alone was never loaded (the daemon's events since the mark say why if it was)
        assert env.daemon.since(mark, "config.loaded") == [], env.daemon.since(mark)
        f.write(second)
    loaded = env.daemon.wait(mark, "the whole file", lambda e: e.get("event") == "config.loaded")
    assert loaded["policies"] == env.policies + 2
    assert env.daemon.since(mark, "config.invalid") == []

    # an atomic save: written in parts under another name, then renamed into place
    temporary = env.config / "policies" / "r.yaml.tmp"
    mark = env.daemon.mark()
    with temporary.open("w") as f:
        f.write(policy_yaml("r1", "esxi1", ["web01"], schedule="{manual: true}"))
        f.flush()
        time.sleep(2 * DEBOUNCE)
        f.write(policy_yaml("r2", "esxi1", ["db 01"], schedule="{manual: true}"))
    temporary.rename(env.config / "policies" / "r.yaml")
    loaded = env.daemon.wait(
        mark,
        "the renamed file",
        lambda e: e.get("event") == "config.loaded" and e["policies"] > env.policies + 2,
    )
    assert loaded["policies"] == env.policies + 4
    assert [e["policies"] for e in env.daemon.since(mark, "config.loaded")] == [env.policies + 4]
    ledger.count("faults_injected", 2)
    mark = env.daemon.mark()
    path.unlink()
    (env.config / "policies" / "r.yaml").unlink()
    back_to_good(env, mark)


BOMB = """\
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {name: bomb}
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
spec: *i
"""
"""Billion laughs: 9⁹ strings once the aliases are expanded."""


def test_yaml_bomb_is_refused_unexpanded(env: Env, ledger: Ledger) -> None:
    # in-process first: refused in bounded time and memory (nothing is expanded)
    tracemalloc.start()
    try:
        with bounded("parse_text(bomb)", 10.0):
            documents, issues = parse_text(BOMB, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert documents == [] and peak < 10 << 20, peak
    assert str(issues[0]) == "bomb.yaml:4:4 anchors are not allowed (&a); write values out"
    # the daemon
    mark = env.daemon.mark()
    path = env.config / "policies" / "bomb.yaml"
    path.write_text(BOMB)
    rejected(env, mark, "policies/bomb.yaml", 4, "anchors are not allowed (&a)")
    assert env.daemon.rss_mib() < MAX_RSS_MIB
    ledger.count("faults_injected")
    mark = env.daemon.mark()
    path.unlink()
    back_to_good(env, mark)


def test_a_50_megabyte_file_is_refused_unread(env: Env, ledger: Ledger) -> None:
    path = env.config / "policies" / "huge.yaml"
    mark = env.daemon.mark()
    with path.open("w") as f:
        line = "# " + "x" * 1021 + "\n"
        for _ in range(50 * 1024):
            f.write(line)
    assert path.stat().st_size == 50 << 20
    issue = env.daemon.wait(
        mark, "the huge file refused", lambda e: e.get("event") == "config.invalid" and "huge" in e["file"]
    )
    assert issue["file"] == "policies/huge.yaml" and "larger than 1024 KiB" in issue["message"]
    assert "split it" in issue["message"]
    verdict = env.daemon.wait(mark, "config.rejected", lambda e: e.get("event") == "config.rejected")
    assert verdict["running_revision"] == env.good
    assert env.daemon.rss_mib() < MAX_RSS_MIB
    ledger.count("faults_injected")
    mark = env.daemon.mark()
    path.unlink()
    back_to_good(env, mark)


def test_duplicate_keys(env: Env, ledger: Ledger) -> None:
    path = env.config / "policies" / "p.yaml"
    good = path.read_text()
    lines = good.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("host:"))
    mark = env.daemon.mark()
    path.write_text("".join([*lines[: at + 1], "  host: esxi2\n", *lines[at + 1 :]]))
    issue = rejected(env, mark, "policies/p.yaml", at + 2, "duplicate key 'host'")
    assert f"first defined at line {at + 1}" in issue["message"]
    ledger.count("faults_injected")
    mark = env.daemon.mark()
    path.write_text(good)
    back_to_good(env, mark)


def test_a_secret_file_readable_by_others(env: Env, ledger: Ledger) -> None:
    """A new password file for a host, left with mode 644: the change is refused at the line that names
    it, with the fix; the host keeps the last good password."""
    path = env.config / "hosts" / "esxi1.yaml"
    good = path.read_text()
    old_file = next(p for p in env.secrets.iterdir() if p.name == "esxi1.pw")
    new_file = env.secrets / "esxi1-new.pw"
    private_file(new_file, old_file.read_text())
    new_file.chmod(0o644)
    lines = good.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "credentials:" in line)
    mark = env.daemon.mark()
    path.write_text(good.replace(str(old_file), str(new_file)))
    issue = rejected(env, mark, "hosts/esxi1.yaml", at + 1, f"run: chmod 600 {new_file}")
    assert issue["field"] == "spec.credentials.password" and "mode 0644" in issue["message"]
    ledger.count("faults_injected")
    mark = env.daemon.mark()
    path.write_text(good)
    back_to_good(env, mark)
    new_file.unlink()


def mail_after(env: Env, start: int, subject: str) -> Mail:
    """The first mail with ``subject`` among those that arrived after the first ``start`` (a message of
    an earlier test may still arrive)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = [m for m in env.smtp.mails[start:] if m.subject == subject]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no mail {subject!r}; got {[m.subject for m in env.smtp.mails[start:]]}")


def test_rejections_are_told_and_no_notifier_secret_is_anywhere(
    env: Env, ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rejected change reaches the mail and Gotify notifiers (and its recovery after the fix); the
    notifier with the wrong password fails, and says why, without either password. The secret scan
    (conftest) checks the daemon's log, the verbs' output and, at the end, the status file."""
    path = env.config / "policies" / "p.yaml"
    good = path.read_text()
    mails = len(env.smtp.mails)
    at = next(i for i, line in enumerate(good.splitlines()) if line.lstrip().startswith("host:")) + 1
    mark = env.daemon.mark()
    path.write_text(re.sub(r"(?m)^  host: .*$", "  host: esxi9", good, count=1))
    rejected(env, mark, "policies/p.yaml", at, "esxi9")
    ledger.count("faults_injected")
    mail = mail_after(env, mails, "[esxi-reconciler] Config rejected: the config")
    assert mail.authenticated_as == "backup" and f"policies/p.yaml:{at}:" in mail.body
    push = env.receiver.wait_for(
        1, WAIT, lambda r: r.json()["title"] == mail.subject and "esxi9" in r.json()["message"]
    )[-1]
    assert push.headers["x-gotify-key"] == GOTIFY_TOKEN  # the token reached Gotify, and only Gotify
    failed = env.daemon.wait(
        mark,
        "the wrong password's failed attempt",
        lambda e: e.get("event") == "notify.attempt_failed" and e.get("notifier") == "ops-mail-wrong",
    )
    assert "authentication" in failed["error"].lower() or "535" in failed["error"], failed

    mark = env.daemon.mark()
    path.write_text(good)
    back_to_good(env, mark)
    mail_after(env, env.smtp.mails.index(mail) + 1, "[esxi-reconciler] Recovered: the config")

    # notify test through the wrong password: exit 1, the cause in one line, recorded in the history
    argv = ["--config", str(env.config), "--state-dir", str(env.state), "--log-level", "critical"]
    assert main([*argv, "notify", "test", "ops-mail-wrong"]) == 1
    err = capsys.readouterr().err  # also holds the SMTP server's own log lines (this process)
    (line,) = [line for line in err.splitlines() if line.startswith("esxi-reconciler ")]
    assert line.startswith("esxi-reconciler notify test: notifier ops-mail-wrong: not sent:"), err
    assert main([*argv, "history", "--kind", "notify", "--json", "--limit", "0"]) == 0
    events = json.loads(capsys.readouterr().out)["events"]
    wrong = [e for e in events if e["subject"] == "ops-mail-wrong"]
    assert wrong and all(e["outcome"] == "failed" for e in wrong)
    assert any(e["subject"] == "ops-mail" and e["outcome"] == "ok" for e in events)
    status_file = status_path(env.state).read_bytes()
    for secret in (SMTP_PASSWORD, WRONG_PASSWORD, GOTIFY_TOKEN):
        assert secret.encode() not in status_file
