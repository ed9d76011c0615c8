"""The listener's pure parts and its config: the page escapes what comes from outside, readiness,
the token in each form a client sends it, the counters never going down, the Monitoring kind's rules;
and the real listener on a loopback port calling the git source's "fetch now"."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import ssl
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from reconciler.config import ConfigError, load_config
from reconciler.config.model import Listen
from reconciler.config.secrets import Secret
from reconciler.status.conditions import Condition
from reconciler.status.history import Event
from reconciler.web.page import growth, render_page
from reconciler.web.record import fold
from reconciler.web.server import Listener, Routes, readiness, token_matches
from reconciler.web.view import DaemonState, EventRow, Snapshot
from tests.notifyservers import make_certificate

NOW = datetime(2026, 12, 7, 4, 0, tzinfo=timezone.utc)
HOSTILE = "<script>alert(\"x\")</script>\n'q' &amp;"


def snapshot(**extra: Any) -> Snapshot:
    daemon = DaemonState(
        NOW - timedelta(hours=1), True, "git:abc", 3, False, None, NOW - timedelta(minutes=2)
    )
    vm_name = f"esxi1/{HOSTILE}"
    fields: dict[str, Any] = dict(
        now=NOW,
        version="0.1.0",
        daemon=daemon,
        conditions=[Condition("vm", vm_name, "Stalled", "BackupFailed", f"failed: {HOSTILE}", updated=NOW)],
        inventory={
            "hosts": [
                {
                    "name": "esxi1",
                    "reachable": True,
                    "license": "free",
                    "datastores": [],
                    "vms": [{"name": HOSTILE, "protected_by": ["p"]}],
                }
            ],
            "repositories": [],
        },
        points={
            "nas": {
                "reachable": True,
                "points": [
                    {
                        "id": "pt-1",
                        "host": "esxi1",
                        "vm": HOSTILE,
                        "started": NOW.isoformat(),
                        "mode": "full",
                        "status": "success",
                        "logical_bytes": 10,
                        "read_bytes": 5,
                        "stored_bytes": 3,
                    }
                ],
            }
        },
        plan_text=f"  + backup esxi1/{HOSTILE!r}\n\nPlan: 1 backup.\n",
    )
    fields.update(extra)
    return Snapshot(**fields)


def test_the_page_escapes_every_name_and_message() -> None:
    html = render_page(snapshot())
    assert "<script>" not in html and "</script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;\\n&#x27;q&#x27; &amp;amp;" in html
    assert "\n\nPlan: 1 backup.</pre>" in html  # the plan's own line breaks stay lines
    assert 'content="width=device-width, initial-scale=1"' in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing external


def test_readiness() -> None:
    ready = DaemonState(NOW, True, "r", 1, False, None, NOW - timedelta(minutes=5))
    assert readiness(ready, NOW, timedelta(minutes=10))[0]
    assert not readiness(ready, NOW, timedelta(minutes=1))[0]
    assert readiness(DaemonState(NOW, True, "r", 2, True), NOW, timedelta(minutes=1))[0]
    assert readiness(DaemonState(NOW, False, None, 0, False), NOW, timedelta(hours=1)) == (
        False,
        "no valid config is loaded (see the config condition)",
    )
    assert not readiness(None, NOW, timedelta(hours=1))[0]


def test_the_token_in_every_form() -> None:
    body = b"{}"
    basic = base64.b64encode(b"me:s3cret").decode()
    mac = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert token_matches("s3cret", {"Authorization": "Bearer s3cret"}, body)
    assert token_matches("s3cret", {"Authorization": f"Basic {basic}"}, body)
    assert token_matches("s3cret", {"X-Gitlab-Token": "s3cret"}, body)
    assert token_matches("s3cret", {"X-Hub-Signature-256": f"sha256={mac}"}, body)
    assert not token_matches("s3cret", {"X-Hub-Signature-256": f"sha256={mac}"}, b"{ }")
    assert not token_matches("s3cret", {"Authorization": "Bearer s3cre"}, body)
    assert not token_matches("s3cret", {"Authorization": "Basic !!"}, body)
    assert not token_matches("s3cret", {}, body)


def _backup(id_: int, read: int, outcome: str = "ok") -> Event:
    return Event(NOW, "backup", "esxi1/a", outcome, host="esxi1", vm="a", policy="p",  # type: ignore[arg-type]
                 started=NOW - timedelta(seconds=10), detail={"bytes_read": read}, id=id_)  # fmt: skip


def test_counters_fold_each_event_once_and_never_go_down() -> None:
    first = fold(None, [_backup(1, 100), _backup(2, 50, "failed")])
    assert first["series"]["esxi1\ta\tp"] == {
        "backups_ok": 1,
        "bytes_read": 100,
        "duration_count": 1,
        "duration_sum": 10.0,
        "backups_failed": 1,
    }
    again = fold(first, [_backup(1, 100), _backup(3, 7)])  # 1 was folded already; 3 is new
    assert again["series"]["esxi1\ta\tp"]["bytes_read"] == 107 and again["last_id"] == 3
    assert fold(again, [])["series"] == again["series"]  # compaction deleted events: nothing goes down
    cli_run = Event(NOW, "backup", "policy p", "ok", policy="p", id=4)  # `backup p`: no host, no VM
    assert fold(again, [cli_run])["series"] == again["series"]


def test_growth_walks_back_from_the_counted_size() -> None:
    rows = [
        EventRow(
            1,
            NOW - timedelta(hours=3),
            "backup",
            "s",
            "ok",
            "",
            repository="nas",
            detail={"bytes_stored": 40},
        ),
        EventRow(
            2, NOW - timedelta(hours=2), "gc", "nas", "ok", "", repository="nas", detail={"bytes_freed": 10}
        ),
        EventRow(
            3, NOW - timedelta(hours=1), "backup", "s", "ok", "", repository="nas", detail={"bytes_stored": 5}
        ),
    ]
    assert [v for _, v in growth(rows, "nas", 100.0, NOW)] == [65.0, 105.0, 95.0, 100.0, 100.0]


def _monitoring(tmp_path: Path, listen: str) -> Path:
    (tmp_path / "m.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: Monitoring\nmetadata: {name: m}\n"
        f"spec:\n  listen: {listen}\n"
    )
    return tmp_path


def test_a_listener_off_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(_monitoring(tmp_path, "{address: 0.0.0.0}"))
    (issue,) = error.value.issues
    assert issue.path == "spec.listen.token" and "not a loopback address (0.0.0.0)" in issue.message
    assert error.value.monitoring is None


def test_the_monitoring_defaults(tmp_path: Path) -> None:
    monitoring = load_config(_monitoring(tmp_path, "{}")).monitoring
    assert monitoring is not None and monitoring.listen == Listen("127.0.0.1", 9137, None)
    assert monitoring.ready_after == timedelta(minutes=30) and monitoring.textfile is None


def test_only_one_monitoring_document(tmp_path: Path) -> None:
    _monitoring(tmp_path, "{}")
    (tmp_path / "n.yaml").write_text((tmp_path / "m.yaml").read_text().replace("name: m", "name: n"))
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path)
    assert "only one Monitoring document is allowed; the first is at m.yaml:2:" in str(error.value)


def test_the_webhook_fetches_the_git_source_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_TOKEN", "hook-secret")
    polls: list[int] = []
    routes = Routes(
        snapshot=snapshot,
        daemon=lambda: None,
        ready_after=lambda: timedelta(minutes=5),
        clock=lambda: NOW,
        poll_source=lambda: polls.append(1),
    )
    listener = Listener(Listen("127.0.0.1", 0, Secret.from_reference({"env": "WEB_TOKEN"})), routes)
    listener.start()
    try:
        hook = listener.url + "hooks/git"

        def post(headers: dict[str, str]) -> int:
            req = urllib.request.Request(hook, data=b"{}", method="POST", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as err:
                return int(err.code)

        assert post({}) == 401 and polls == []
        assert post({"X-Gitlab-Token": "hook-secret"}) == 202 and polls == [1]
        assert post({"Authorization": "Bearer hook-secret"}) == 202 and polls == [1, 1]
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(listener.url + "readyz", timeout=10)
        assert not_ready.value.code == 503
    finally:
        listener.stop()


def _get(url: str, **kwargs: Any) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10, **kwargs) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


def test_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    routes = Routes(snapshot, lambda: None, lambda: timedelta(minutes=5), lambda: NOW)
    listener = Listener(Listen("127.0.0.1", 0, None, PurePosixPath(cert), PurePosixPath(key)), routes)
    listener.start()
    try:
        assert listener.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        assert _get(listener.url + "healthz", context=trusted) == (200, "ok\n")
        status, page = _get(listener.url, context=trusted)
        assert status == 200 and "&lt;script&gt;" in page
        with pytest.raises(urllib.error.URLError):  # a client that does not trust it gets nothing
            _get(listener.url + "healthz", context=ssl.create_default_context())
    finally:
        listener.stop()


MONITORING = """\
apiVersion: esxi-reconciler/v1
kind: Monitoring
metadata: {{name: m}}
spec: {{listen: {{port: {port}}}, ready_after: 1h}}
"""


def test_the_daemon_serves_readiness_from_start_up_through_a_fixed_config(tmp_path: Path) -> None:
    """An invalid first config still starts its own (valid) listener: /healthz 200, /readyz 503 naming
    the cause; once the config is fixed and a cycle ran, /readyz 200; a new port moves the listener."""
    from tests.unit.test_daemon_loop import INVALID, VALID, Recorder, make, start, stop, wait_for

    config = tmp_path / "config"
    config.mkdir()
    port, other = _free_port(), _free_port()
    (config / "monitoring.yaml").write_text(MONITORING.format(port=port))
    (config / "repo.yaml").write_text(INVALID.format(name="r"))
    cycle = Recorder()
    daemon = make(config, tmp_path, cycle)
    thread, codes = start(daemon)
    base = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: _up(base), "the listener of the rejected config")
        assert _get(base + "healthz") == (200, "ok\n")
        assert _get(base + "readyz") == (
            503,
            "not ready: no valid config is loaded (see the config condition)\n",
        )
        assert cycle.contexts == []

        (config / "repo.yaml").write_text(VALID.format(name="r"))
        daemon.request_reload()
        wait_for(lambda: len(cycle.contexts) == 1 and daemon._worker is None, "a cycle of the fixed config")
        # the loop records the finished cycle just after it marks the worker gone: poll, not one look
        wait_for(lambda: _get(base + "readyz")[0] == 200, "readiness after the fixed config's cycle")
        status, body = _get(base + "readyz")
        assert status == 200 and body.startswith("ready: last cycle finished"), body
        metrics = _get(base + "metrics")[1]
        assert (
            "esxi_reconciler_config_loaded 1.0" in metrics and "esxi_reconciler_cycles_total 1.0" in metrics
        )

        (config / "monitoring.yaml").write_text(MONITORING.format(port=other))
        daemon.request_reload()
        wait_for(lambda: _up(f"http://127.0.0.1:{other}/"), "the listener on its new port")
        assert not _up(base)
    finally:
        assert stop(daemon, thread, codes) == 0
    assert not _up(f"http://127.0.0.1:{other}/")  # stopped with the daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(base: str) -> bool:
    try:
        return _get(base + "healthz")[0] == 200
    except OSError:
        return False


def test_an_unreachable_host_still_lists_its_protected_vms() -> None:
    down = {
        "hosts": [
            {"name": "esxi1", "reachable": False, "error": "connection refused", "vms": [], "datastores": []}
        ],
        "repositories": [],
    }
    html = render_page(snapshot(inventory=down))
    hosts = html.split("<h2>Hosts and VMs</h2>", 1)[1].split("</section>", 1)[0]
    assert "connection refused" in hosts and "&lt;script&gt;alert(&quot;x&quot;)" in hosts
    assert "BackupFailed" in hosts
