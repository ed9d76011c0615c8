"""The daemon following a config repository served over real OpenSSH (the lab's git server: a deploy
key restricted to git, a host key the source pins), with signatures required, running its real cycle
against a real restore-point repository.

One story, in order: the first signed commit is applied; a pushed commit is applied within the
interval; a broken commit is reported with file:line while the previous revision stays applied; an
unsigned commit is refused and a correctly SSH-signed one applied; a force-push to an older commit is
reported and not applied; a change that would prune more than the applied guard waits for approval,
and once a signed commit approves it the daemon's own cycle prunes. Then: a wrong host key pin and a
refused deploy key are fetch failures that say so.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from esxisim.gitserver import GitServer
from esxisim.sshd import keygen, public_key
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
    point_count,
    policy_doc,
    repository_doc,
    source_doc,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

WAIT = 90.0


wait_for = partial(wait_until, timeout=WAIT, poll=0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    with GitServer(tmp_path_factory.mktemp("gitserver")) as running:
        yield running


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    made = Keys.make(tmp_path_factory.mktemp("keys"))
    try:
        yield made
    finally:
        made.close()


def ssh_source(
    server: GitServer, keys: Keys, *, host_key: str | None = None, key_file: Path | None = None
) -> str:
    key = key_file or server.deploy_key
    key.chmod(0o600)
    block = f'  ssh:\n    private_key: {{file: {key}}}\n    host_keys: ["{host_key or server.host_key}"]\n'
    return source_doc(
        server.url("config"), interval="1s", ssh=block, signers=[("alice", "ssh", keys.ssh_public("alice"))]
    )


def source_status(state: Path) -> SourceStatus | None:
    if not status_path(state).exists():
        return None
    with StatusStore.open(status_path(state), readonly=True) as store:
        return store.source_status()


def test_the_daemon_follows_a_repository_over_ssh(
    server: GitServer, keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HOST_PASSWORD_ENV, "unused-password")
    server.create("config")
    push_ssh = " ".join(
        shlex.quote(part)
        for part in (
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(server.deploy_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        )
    )
    work = ConfigRepo(tmp_path / "work", server.url("config"), keys, ssh_command=push_ssh)
    backups = tmp_path / "backups"
    make_points(backups, "web", 10)
    state = tmp_path / "state"

    def config(retention: str = "{keep_last: 10}", max_deletions: int = 5) -> None:
        work.write("esxi/hosts.yaml", HOST_DOC)
        work.write("esxi/repository.yaml", repository_doc(backups, max_deletions=max_deletions))
        work.write("esxi/policies.yaml", policy_doc("web", retention=retention))

    def push(
        message: str, *, sign: str | None = "alice", trailer: str | None = None, force: bool = False
    ) -> str:
        commit = work.commit(message, sign=sign, trailer=trailer)
        work.push(force=force)
        return commit

    def status() -> SourceStatus:
        found = source_status(state)
        assert found is not None
        return found

    config()
    first = push("first")
    source_file = tmp_path / "source.yaml"
    source_file.write_text(ssh_source(server, keys))
    tracker = SourceTracker(load_source(source_file), state)
    daemon = Daemon(tracker.config_dir, state, source=tracker, notifier=Notifier({}))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()

    def running(commit: str) -> bool:
        return daemon.desired is not None and daemon.desired.revision.id == f"git:{commit}"

    def planned(commit: str) -> bool:
        """A cycle of ``commit`` has planned (and so applied what it planned, or is applying it)."""
        with StatusStore.open(status_path(state), readonly=True) as store:
            last = store.last_plan()
        return last is not None and last.revision == f"git:{commit}"

    try:
        wait_for("the first commit applied", lambda: running(first))
        assert status().applied == first and status().applied_signer == "alice"

        config(retention="{keep_last: 11}")
        second = push("a pushed commit")
        wait_for("the pushed commit applied", lambda: running(second))

        work.write("esxi/policies.yaml", policy_doc("web", retention="{keep_last: -1}"))
        broken = push("broken")
        wait_for("the broken commit refused", lambda: status().failed == broken)
        assert status().failed_reason == "InvalidConfig"
        assert (status().failed_message or "").startswith(
            "esxi/policies.yaml:10:15 spec.retention.keep_last: -1 is less"
        )
        assert status().applied == second and running(second)

        config(retention="{keep_last: 10}")
        unsigned = push("valid but unsigned", sign=None)
        wait_for("the unsigned commit refused", lambda: status().failed == unsigned)
        assert (status().failed_reason, status().failed_message) == ("SignatureRefused", "not signed")
        assert running(second)
        signed = push("the same, signed")
        wait_for("the signed commit applied", lambda: running(signed))

        work.reset(second)
        work.push(force=True)
        wait_for("the force-push refused", lambda: status().failed == second)
        assert status().failed_reason == "Rollback"
        assert (status().failed_message or "").startswith(
            f"{second[:12]} is older than the applied {signed[:12]}"
        )
        assert running(signed)
        work.reset(signed)
        work.push(force=True)

        # Shorter retention and a raised guard: 8 of the 10 points would go in one run. Held.
        wait_for("a cycle of the signed commit", lambda: planned(signed))
        config(retention="{keep_last: 2}", max_deletions=50)
        mass = push("keep two, let them go")
        wait_for("the mass deletion held", lambda: status().failed == mass)
        assert status().failed_reason == "NeedsApproval"
        assert "8 restore points would be pruned in one run, more than max_deletions_per_run 5" in (
            status().failed_message or ""
        )
        daemon.request_reload()  # a cycle under the applied revision prunes nothing
        time.sleep(3)
        assert running(signed) and point_count(backups) == 10

        approval = push("approved", trailer="Approve-Destructive: retention cut, checked by alice")
        wait_for("the approved change applied", lambda: running(approval))
        wait_for("the daemon's cycle pruned", lambda: point_count(backups) == 2)
        assert status().applied == approval and status().failed == mass  # the last refusal stays shown
    finally:
        daemon.request_stop()
        thread.join(60)
    assert not thread.is_alive()


def test_a_wrong_pin_or_key_is_a_fetch_failure_that_says_so(
    server: GitServer, keys: Keys, tmp_path: Path
) -> None:
    server.create("pins")
    other = tmp_path / "other"
    other.mkdir()
    impostor = GitServer(other)  # only for its freshly generated host key and client key
    impostor.ssh_dir.mkdir(parents=True)
    keygen(impostor.ssh_dir / "ssh_host_ed25519_key", "ed25519", None, "x")
    keygen(impostor.deploy_key, "ed25519", None, "y")
    wrong_host = " ".join(public_key(impostor.ssh_dir / "ssh_host_ed25519_key"))

    def fetch(text: str) -> str:
        path = tmp_path / "source.yaml"
        path.write_text(text.replace("/config.git", "/pins.git"))
        syncer = Syncer(load_source(path), tmp_path / "state")
        syncer.open()
        result = syncer.poll(None)
        assert result.reason == "FetchFailed"
        return result.message

    pinned = fetch(ssh_source(server, keys, host_key=wrong_host))
    assert "Host key verification failed" in pinned
    assert "(the server did not present a pinned host key (spec.ssh.host_keys))" in pinned
    refused = fetch(ssh_source(server, keys, key_file=impostor.deploy_key))
    assert "Permission denied (publickey)" in refused and "the deploy key was refused" in refused
    assert not list((tmp_path / "state" / "source" / "ssh").glob("deploy_key*"))  # only there while fetching
