"""The git webhook: a forge's push hook to ``POST /hooks/git`` of the daemon's listener makes the
daemon fetch its git source at once (the source's interval here is an hour), against a real bare
repository over ``file://``; a hook without the secret fetches nothing."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import urllib.error
import urllib.request

import pytest

from reconciler.config.source import load_source
from reconciler.daemon import Daemon, Notifier
from reconciler.daemon.source import SourceTracker
from tests.integration.gitremote import policy_doc
from tests.integration.test_gitsource import Recorder, World, keys, wait_for, world  # noqa: F401

SECRET = "forge-hook-secret-42"


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_a_push_hook_fetches_the_source_now(world: World, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    monitoring = (
        "apiVersion: esxi-reconciler/v1\nkind: Monitoring\nmetadata: {name: m}\n"
        f"spec: {{listen: {{port: {port}, token: {{env: HOOK_SECRET}}}}}}\n"
    )
    world.config(policy_doc("web"))
    world.work.write("esxi/monitoring.yaml", monitoring)
    first = world.push("first")
    tracker = SourceTracker(load_source(world.source(interval="1h")), world.state)
    recorder = Recorder()
    daemon = Daemon(tracker.config_dir, world.state, source=tracker, cycle=recorder, notifier=Notifier({}))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    hook = f"http://127.0.0.1:{port}/hooks/git"
    try:
        wait_for("the first commit applied", lambda: f"git:{first}" in recorder.revisions)
        world.work.write("esxi/policies.yaml", policy_doc("web", retention="{keep_last: 12}"))
        second = world.push("longer retention")
        body = b'{"ref": "refs/heads/main", "after": "' + second.encode() + b'"}'

        assert post(hook, body, {"X-Gitlab-Token": "wrong"}) == 401
        forged = "sha256=" + hmac.new(b"wrong", body, hashlib.sha256).hexdigest()
        assert post(hook, body, {"X-Hub-Signature-256": forged}) == 401

        signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert post(hook, body, {"X-Hub-Signature-256": signature, "X-Gitea-Event": "push"}) == 202
        wait_for("the pushed commit applied after the hook", lambda: f"git:{second}" in recorder.revisions)
    finally:
        daemon.request_stop()
        thread.join(30)
