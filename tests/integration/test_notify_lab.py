"""The daemon tells its owner, driven by real lab failures: e-mail over STARTTLS with a password (aiosmtpd)
and a Gotify-style push with a token (an HTTP receiver) get one message when the licensed host goes
down — naming the host, its VM and the cause — and no more while it stays down; a recovery message
when it comes back (the push, rate-limited to one message an hour, gets it only once the hour is over,
marked as held back); a verification that finds a damaged chunk; and a daily summary once the
daemon's clock passes its time. Every send is in the history, and no secret is in any message, the
status file or the log."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from esxisim.handle import LabHandle
from reconciler.config import load_config
from reconciler.daemon import Daemon
from reconciler.daemon.notify import Notifier as SystemdNotifier
from reconciler.operations.repositories import open_repository
from reconciler.repository import KdfParams, Repository
from reconciler.repository.chunks import HOLE, chunk_name
from reconciler.repository.errors import LockedError
from reconciler.status.history import HistoryQuery
from reconciler.status.store import StatusStore, StatusStoreError, status_path
from tests.integration.labconfig import PASSPHRASE, policy_yaml, private_file, write_lab_config
from tests.notifyservers import HttpReceiver, Mail, http_receiver, make_certificate, smtp_server
from tests.waiting import OffsetClock as Clock
from tests.waiting import wait_until as _wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

SMTP_PASSWORD = "Lab-smtp-Pa55word/42"
TOKEN = "GotifyTokenLab0123456789"
VM = "app202"


wait_until = partial(_wait_until, timeout=120.0, poll=0.3)


def titled(mails: list[Mail], prefix: str) -> list[Mail]:
    return [m for m in mails if m.subject.startswith(prefix)]


@pytest.fixture
def trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    cert = make_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    return cert


@pytest.fixture
def push() -> Iterator[HttpReceiver]:
    with http_receiver() as receiver:
        yield receiver


def test_the_owner_hears_of_failures_recoveries_damage_and_gets_a_summary(
    lab_faults: LabHandle,
    tmp_path: Path,
    trusted: tuple[Path, Path],
    push: HttpReceiver,
    capfd: pytest.CaptureFixture[str],
) -> None:
    lab = lab_faults
    host = lab.licensed
    policies = policy_yaml("apps-hourly", host, [VM], schedule="{every: 1h}", extra="  cbt: unmanaged\n") + (
        "---\napiVersion: esxi-reconciler/v1\nkind: VerifyPolicy\nmetadata: {name: check}\n"
        "spec: {repository: r, schedule: {every: 10m}, read_data_percent: 100}\n"
    )
    config = write_lab_config(lab, tmp_path, policies)
    # the daily summary 6 hours from now (UTC): never passed by the 72 minutes the clock moves before
    # step 4, always by its 25 hours, whatever the time of day the test runs
    summary_at = f"{datetime.now(timezone.utc) + timedelta(hours=6):%H:%M}"
    secrets = tmp_path / "secrets"
    smtp_secret = private_file(secrets / "smtp.pw", SMTP_PASSWORD)
    token_secret = private_file(secrets / "gotify.token", TOKEN)
    with smtp_server(certificate=trusted, tls="starttls", password=SMTP_PASSWORD) as smtp:
        (config / "notifiers.yaml").write_text(
            f"""apiVersion: esxi-reconciler/v1
kind: Notifier
metadata: {{name: ops-mail}}
spec:
  url: "mailtos://backup:{{password}}@127.0.0.1:{smtp.port}?from=backup@example.org&to=ops@example.org"
  secrets: {{password: {{file: {smtp_secret}}}}}
  summary: {{daily: {{at: "{summary_at}"}}, timezone: UTC}}
  repository_min_free: {{percent: 0}}
---
apiVersion: esxi-reconciler/v1
kind: Notifier
metadata: {{name: phone}}
spec:
  url: "gotify://127.0.0.1:{push.port}/{{token}}"
  secrets: {{token: {{file: {token_secret}}}}}
  rate_limit: {{messages: 1, per: 1h}}
  repository_min_free: {{percent: 0}}
"""
        )
        desired = load_config(config)
        Repository.init(tmp_path / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
        repo = open_repository(desired.repository("r"))
        state = tmp_path / "state"
        clock = Clock()
        daemon = Daemon(
            config, state, resync=1.0, debounce=0.3, min_interval=0.5, clock=clock,
            notifier=SystemdNotifier({}), notify_delays=(0.2, 0.5), watch=False,
        )  # fmt: skip
        exit_codes: list[int] = []
        thread = threading.Thread(target=lambda: exit_codes.append(daemon.run()), name="daemon")
        thread.start()

        def events(**query: Any) -> list[Any]:
            if not status_path(state).exists():
                return []
            try:
                with StatusStore.open(status_path(state), readonly=True) as store:
                    return store.events.events(HistoryQuery(limit=None, **query))
            except StatusStoreError:  # the daemon is creating the file right now
                return []

        def cycles_pass(count: int) -> None:
            target = daemon.cycles + count
            wait_until(f"{count} more cycles", lambda: daemon.cycles >= target)

        try:
            # The first cycle backs up and verifies: nothing to tell.
            wait_until("the first backup", lambda: events(kinds=("backup",), outcomes=("ok",)))
            wait_until("the first verification", lambda: events(kinds=("verify",), outcomes=("ok",)))
            cycles_pass(2)
            assert smtp.mails == [] and push.requests == []

            # 1. The host goes down: one message per channel, naming the host, its VM and the cause.
            lab.fault(host, "host-down")
            (down,) = smtp.wait_for(1, timeout=120)
            assert down.subject == f"[esxi-reconciler] Backup failed: host {host}"
            assert VM in down.body and "refused" in down.body.lower(), down.body
            assert down.body.startswith(f"Needs attention:\r\n- Backup failed: host {host}: unreachable: ")
            assert down.recipients == ["ops@example.org"] and down.authenticated_as == "backup"
            (pushed,) = push.wait_for(1)
            assert pushed.headers["x-gotify-key"] == TOKEN
            assert pushed.json()["title"] == down.subject and VM in pushed.json()["message"]
            cycles_pass(3)  # still down, cycle after cycle: nothing more
            assert len(smtp.mails) == 1 and len(push.requests) == 1

            # 2. It comes back: a recovery e-mail; the push has used its one message of the hour.
            lab.fault(host, "host-up")
            wait_until("the recovery e-mail", lambda: titled(smtp.mails, "[esxi-reconciler] Recovered"))
            (back,) = titled(smtp.mails, "[esxi-reconciler] Recovered")
            assert back.subject == f"[esxi-reconciler] Recovered: host {host}"
            assert f"- host {host}: OK again (was: backup failed: unreachable: " in back.body
            wait_until(
                "the rate limit recorded",
                lambda: events(kinds=("notify",), outcomes=("warning",)),
            )
            cycles_pass(2)
            assert len(push.requests) == 1
            clock.advance(timedelta(minutes=61))  # the hour is over: the held recovery goes out
            (_, held) = push.wait_for(2)
            assert held.json()["title"] == f"[esxi-reconciler] Recovered: host {host}"
            assert "held back by the rate limit since" in held.json()["message"]

            # 3. A chunk rots: the next scheduled verification finds it.
            newest = wait_until("a point", lambda: sorted(_points(repo), key=lambda p: p.time))[-1]
            victim = next(c for c in repo.read_index(newest.disks[0].index).referenced() if c != HOLE)
            path = repo.path / chunk_name(victim)
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0x40
            path.write_bytes(bytes(blob))
            clock.advance(timedelta(minutes=11))
            wait_until(
                "the damage e-mail",
                lambda: titled(smtp.mails, "[esxi-reconciler] Verification found damage"),
            )
            (damage,) = titled(smtp.mails, "[esxi-reconciler] Verification found damage")
            assert damage.subject == "[esxi-reconciler] Verification found damage: repository r"
            assert "repository r: " in damage.body and "problem" in damage.body, damage.body

            # 4. The daemon's clock passes the summary's time: the daily summary.
            clock.advance(timedelta(hours=25))
            wait_until("the summary", lambda: titled(smtp.mails, "[esxi-reconciler] Summary"), timeout=180)
            (summary,) = titled(smtp.mails, "[esxi-reconciler] Summary")
            assert f"- {host}/{VM}: " in summary.body and "backups: " in summary.body
        finally:
            daemon.request_stop()
            thread.join(180)
            lab.clear_faults()
        assert exit_codes == [0]

        sent = events(kinds=("notify",), outcomes=("ok",))
        assert {e.subject for e in sent} == {"ops-mail", "phone"}
        assert len([e for e in sent if e.subject == "ops-mail"]) == len(smtp.mails)
        assert len([e for e in sent if e.subject == "phone"]) == len(push.requests)
        mails = list(smtp.mails)

    # No secret anywhere it must not be: the messages, the status file, the log.
    out, err = capfd.readouterr()
    secrets_of = {
        "SMTP password": SMTP_PASSWORD,
        "push token": TOKEN,
        "repository passphrase": PASSPHRASE,
        **{f"password of {name}": lab.password(name) for name in (lab.free, lab.licensed)},
    }
    places = {
        "status.db": b"".join(p.read_bytes() for p in state.glob("status.db*")),
        "stdout+stderr": (out + err).encode(),
        **{f"mail {m.subject}": m.raw for m in mails},
        **{f"push {r.path}": r.body for r in push.requests},
    }
    found = [
        (what, where)
        for what, value in secrets_of.items()
        for where, data in places.items()
        if value.encode() in data
    ]
    assert found == []


def _points(repo: Repository) -> list[Any]:
    for _ in range(100):
        try:
            with repo.lock(purpose="test"):
                return repo.list_points()
        except LockedError:
            time.sleep(0.2)
    raise AssertionError("the repository stayed locked")
