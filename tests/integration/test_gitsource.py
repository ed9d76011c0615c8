"""The git source against a real bare repository over ``file://``: fetch, trust, rollback, approval,
restart, and ``plan --revision`` of a branch. Real git, real signatures (SSH and OpenPGP), a real
restore-point repository; no ESXi host (the config's host answers on no port).

The same behaviour over SSH with a deploy key and a pinned host key is ``test_gitsource_ssh.py``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from reconciler import cli
from reconciler.config.source import load_source
from reconciler.daemon import CycleContext, CycleResult, Daemon, Notifier
from reconciler.daemon.source import SourceTracker
from reconciler.gitsource.sync import AppliedRevision, PollResult, Syncer
from reconciler.gitsource.trust import TrustError
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
    run,
    source_doc,
)
from tests.waiting import wait_until

WAIT = 60.0


def valid_json(name: str, doc: object) -> None:
    """``doc`` validates against the shipped ``--json`` schema ``name`` (docs/cli-json.md)."""
    from importlib import resources

    import jsonschema

    text = resources.files("reconciler.commands").joinpath(f"json_schemas/{name}.schema.json").read_text()
    jsonschema.Draft202012Validator(json.loads(text)).validate(doc)


wait_for = partial(wait_until, timeout=WAIT, poll=0.05)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    made = Keys.make(tmp_path_factory.mktemp("keys"))
    try:
        yield made
    finally:
        made.close()


@dataclass
class World:
    """A bare remote, the test's work clone, a restore-point repository and a state directory."""

    root: Path
    keys: Keys
    remote: Path = field(init=False)
    work: ConfigRepo = field(init=False)
    backups: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.remote = self.root / "remote.git"
        run(["git", "init", "--bare", "-q", str(self.remote)])
        self.work = ConfigRepo(self.root / "work", f"file://{self.remote}", self.keys)
        self.backups = self.root / "backups"
        self.state = self.root / "state"

    @property
    def url(self) -> str:
        return f"file://{self.remote}"

    def config(self, *policies: str, max_deletions: int = 100) -> None:
        """Replace the config under esxi/ with one host, the repository and ``policies``."""
        self.work.write("esxi/hosts.yaml", HOST_DOC)
        self.work.write("esxi/repository.yaml", repository_doc(self.backups, max_deletions=max_deletions))
        self.work.write("esxi/policies.yaml", "".join(policies) or "# no policy\n")

    def push(
        self, message: str, *, sign: str | None = None, trailer: str | None = None, force: bool = False
    ) -> str:
        commit = self.work.commit(message, sign=sign, trailer=trailer)
        self.work.push(force=force)
        return commit

    def source(self, **options: Any) -> Path:
        path = self.root / "source.yaml"
        path.write_text(source_doc(self.url, **options))
        return path

    def syncer(self, **options: Any) -> Syncer:
        return Syncer(load_source(self.source(**options)), self.state)


@pytest.fixture
def world(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setenv(HOST_PASSWORD_ENV, "unused-password")
    return World(tmp_path, keys)


def accept(syncer: Syncer, applied: AppliedRevision | None) -> tuple[PollResult, AppliedRevision | None]:
    """One poll; the applied revision after it (a newly accepted one is made applied)."""
    result = syncer.poll(applied)
    if result.accepted is not None:
        return result, syncer.accept(result.accepted)
    return result, applied


def commit_of(applied: AppliedRevision | None) -> str | None:
    return applied.commit if applied is not None else None


# -- the daemon ---------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """An injected cycle: which revision each cycle ran."""

    revisions: list[str] = field(default_factory=list)

    def __call__(self, ctx: CycleContext) -> CycleResult:
        self.revisions.append(ctx.desired.revision.id)
        return CycleResult(ok=True, summary="ok")


def source_row(state: Path) -> dict[str, Any]:
    with StatusStore.open(status_path(state), readonly=True) as store:
        status = store.source_status()
        conditions = {c.key: c for c in store.conditions()}
    assert status is not None
    return {"status": status, "conditions": conditions}


def test_the_daemon_applies_pushed_commits_and_keeps_the_last_good_one(world: World) -> None:
    world.config(policy_doc("web"))
    first = world.push("first")
    tracker = SourceTracker(load_source(world.source(interval="1s")), world.state)
    recorder = Recorder()
    daemon = Daemon(tracker.config_dir, world.state, source=tracker, cycle=recorder, notifier=Notifier({}))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for("the first commit applied", lambda: f"git:{first}" in recorder.revisions)
        assert tracker.config_dir.resolve() == (world.state / "source" / "trees" / first / "esxi")

        # A pushed commit is applied within an interval (1 s here; the wait only bounds a slow machine).
        world.work.write("esxi/policies.yaml", policy_doc("web", retention="{keep_last: 12}"))
        second = world.push("longer retention")
        wait_for("the second commit applied", lambda: f"git:{second}" in recorder.revisions)

        # A broken commit: reported with file:line (from the repository's top), the second stays in force.
        world.work.write("esxi/policies.yaml", policy_doc("web", retention="{keep_last: many}"))
        broken = world.push("broken")
        row = wait_for(
            "the broken commit refused",
            lambda: (r := source_row(world.state))["status"].failed == broken and r,
        )
        status = row["status"]
        assert status.failed_reason == "InvalidConfig"
        assert status.failed_message.startswith("esxi/policies.yaml:10:15 spec.retention.keep_last:")
        assert status.applied == second
        condition = row["conditions"][("source", "config")]
        assert (condition.status, condition.reason) == ("Stalled", "InvalidConfig")
        assert f"{broken[:12]} not applied: esxi/policies.yaml:10:15" in condition.message
        assert condition.message.endswith(f"; {second[:12]} stays applied")
        config = row["conditions"][("config", "config")]
        assert (config.status, config.revision) == ("Ready", f"git:{second}")
        assert daemon.desired is not None and daemon.desired.revision.id == f"git:{second}"
        cycles = len(recorder.revisions)

        # SIGHUP (request_reload) fetches at once; the fix is applied.
        world.work.write("esxi/policies.yaml", policy_doc("web", retention="{keep_last: 11}"))
        fixed = world.push("fixed")
        daemon.request_reload()
        wait_for("the fix applied", lambda: f"git:{fixed}" in recorder.revisions)
        assert f"git:{broken}" not in recorder.revisions[cycles:]
        row = source_row(world.state)
        assert row["conditions"][("source", "config")].status == "Ready"
        assert (
            row["status"].applied == fixed and row["status"].failed == broken
        )  # the last failed stays shown
    finally:
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.usefixtures("restore_logging")
def test_run_once_with_a_source_applies_the_head_and_runs_one_cycle(world: World) -> None:
    world.config(policy_doc("web"))
    head = world.push("first")
    state = ["--state-dir", str(world.state), "--log-level", "error"]
    # Exit 1: the config's host answers nowhere, so the cycle leaves it Stalled (`status` says so).
    assert cli.main([*state, "run", "--once", "--source", str(world.source())]) == 1
    with StatusStore.open(status_path(world.state), readonly=True) as store:
        last = store.last_plan()
    assert last is not None and last.revision == f"git:{head}"
    assert (world.state / "source" / "applied").resolve() == world.state / "source" / "trees" / head / "esxi"

    # Nothing trusted (an unsigned head while signatures are required): nothing to run, exit 78.
    other = world.root / "other-state"
    signed_only = world.source(signers=[("alice", "ssh", world.keys.ssh_public("alice"))])
    assert (
        cli.main(
            ["--state-dir", str(other), "--log-level", "error", "run", "--once", "--source", str(signed_only)]
        )
        == 78
    )


def test_status_shows_the_revisions(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    world.config(policy_doc("web"))
    good = world.push("good")
    world.work.write("esxi/policies.yaml", "not: [valid")
    world.push("bad yaml")
    tracker = SourceTracker(load_source(world.source()), world.state)
    with StatusStore.open(status_path(world.state)) as store:
        tracker.open(store)
        tracker.poll_once()  # the head is the bad commit: nothing is applied
    assert cli.main(["status", "--state-dir", str(world.state)]) == 1
    out = capsys.readouterr().out
    assert f"source: {world.url} branch main (path esxi)" in out
    assert re.search(
        r"last failed  [0-9a-f]{12}  \S+ \S+  InvalidConfig: esxi/policies.yaml:1:\d+ YAML syntax error", out
    )
    assert "applied      -" in out
    assert good[:12] not in out
    assert cli.main(["status", "--state-dir", str(world.state), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    valid_json("status", doc)
    assert doc["source"]["failed_reason"] == "InvalidConfig" and doc["source"]["applied"] is None


# -- trust --------------------------------------------------------------------------------------------


def test_only_commits_signed_by_a_listed_key_are_applied(world: World, keys: Keys) -> None:
    world.config(policy_doc("web"))
    signers = [("alice", "ssh", keys.ssh_public("alice")), ("bob", "openpgp", keys.openpgp_public("bob"))]
    syncer = world.syncer(signers=signers)
    applied, problem = syncer.open()
    assert applied is None and problem is None

    unsigned = world.push("unsigned")
    result, applied = accept(syncer, applied)
    assert (result.reason, result.head, result.message) == ("SignatureRefused", unsigned, "not signed")
    assert applied is None

    intruder = world.push("signed by mallory", sign="mallory")
    result, applied = accept(syncer, applied)
    assert (result.reason, result.head) == ("SignatureRefused", intruder)
    assert re.fullmatch(r"signed by a key that is not a trusted signer \(SSH SHA256:\S+\)", result.message)

    trusted = world.push("signed by alice", sign="alice")
    result, applied = accept(syncer, applied)
    assert result.reason == "Accepted" and applied is not None and applied.commit == trusted
    assert applied.signer == "alice" and "signed by alice (SSH SHA256:" in result.message

    eve = world.push("signed by eve", sign="eve")
    result, applied = accept(syncer, applied)
    assert (result.reason, result.head) == ("SignatureRefused", eve)
    assert "not a trusted signer (OpenPGP key" in result.message
    assert commit_of(applied) == trusted

    bob = world.push("signed by bob", sign="bob")
    result, applied = accept(syncer, applied)
    assert (
        result.reason == "Accepted"
        and commit_of(applied) == bob
        and applied is not None
        and applied.signer == "bob"
    )


def test_a_restart_checks_the_applied_revision_again(world: World, keys: Keys) -> None:
    world.config(policy_doc("web"))
    commit = world.push("unsigned but trusted while verification was off")
    applied, _ = world.syncer().open()
    assert applied is None
    _, applied = accept(world.syncer(), None)
    assert applied is not None and applied.commit == commit

    # Restart without signers: the applied revision is back at once, before any fetch.
    restored, problem = world.syncer().open()
    assert restored is not None and restored.commit == commit and problem is None
    assert restored.desired.revision.id == f"git:{commit}"

    # Restart with signers required: the unsigned applied revision is no longer trusted.
    restored, problem = world.syncer(signers=[("alice", "ssh", keys.ssh_public("alice"))]).open()
    assert restored is None
    assert problem == f"the applied revision {commit[:12]} is no longer trusted (not signed)"


# -- history ------------------------------------------------------------------------------------------


def test_a_force_push_to_an_older_commit_is_refused_and_a_rewrite_reported(world: World) -> None:
    world.config(policy_doc("web"))
    first = world.push("first")
    world.work.write("esxi/policies.yaml", policy_doc("web", retention="{keep_last: 12}"))
    second = world.push("second")
    syncer = world.syncer()
    syncer.open()
    _, applied = accept(syncer, None)
    assert applied is not None and applied.commit == second

    world.work.reset(first)
    world.work.push(force=True)
    result, applied = accept(syncer, applied)
    assert (result.reason, result.head) == ("Rollback", first)
    assert result.message.startswith(
        f"{first[:12]} is older than the applied {second[:12]} (an ancestor of it)"
    )
    assert commit_of(applied) == second

    # Allowed explicitly, the rollback is applied.
    rollback = world.syncer(allow_rollback=True)
    rollback.open()
    result, rolled = accept(rollback, applied)
    assert result.reason == "Accepted" and rolled is not None and rolled.commit == first

    # A force-push to a new commit that does not contain the applied one: reported, and applied.
    rewritten = world.push("rewritten history", force=True)
    result, applied = accept(syncer, applied)
    assert result.reason == "Accepted" and commit_of(applied) == rewritten
    assert result.rewritten == (
        f"history rewritten: {rewritten[:12]} does not contain the applied {second[:12]} (a force-push)"
    )


def test_symbolic_links_and_a_missing_directory_are_refused(world: World) -> None:
    world.config(policy_doc("web"))
    (world.work.directory / "esxi" / "secret.yaml").symlink_to("/etc/passwd")
    head = world.push("a link")
    syncer = world.syncer()
    syncer.open()
    result = syncer.poll(None)
    assert (result.reason, result.head) == ("InvalidConfig", head)
    assert result.message.startswith("esxi/secret.yaml is a symbolic link")
    moved = world.syncer(path="elsewhere")
    moved.open()
    result = moved.poll(None)
    assert (
        result.reason == "InvalidConfig"
        and result.message == f"elsewhere is not a directory in commit {head[:12]} (the source's spec.path)"
    )


# -- approval -----------------------------------------------------------------------------------------


def test_a_destructive_change_waits_for_an_approving_commit(world: World, keys: Keys) -> None:
    make_points(world.backups, "web", 10)
    make_points(world.backups, "db", 2)
    world.config(policy_doc("web"), policy_doc("db"), max_deletions=5)
    world.push("two policies", sign="alice")
    syncer = world.syncer(signers=[("alice", "ssh", keys.ssh_public("alice"))])
    syncer.open()
    _, applied = accept(syncer, None)
    assert applied is not None

    # Removing a policy orphans its points: held.
    world.config(policy_doc("web"), max_deletions=5)
    removal = world.push("drop db", sign="alice")
    result, applied = accept(syncer, applied)
    assert (result.reason, result.head) == ("NeedsApproval", removal)
    assert result.message.startswith(
        "BackupPolicy 'db' is removed: its VMs are no longer backed up and its 2 restore points in repository"
        " 'nas' become orphaned"
    )
    assert "Approve-Destructive: <why>" in result.message
    assert commit_of(applied) != removal

    # An approval in an unsigned commit does not count when signatures are required.
    unsigned = world.push("approve", trailer="Approve-Destructive: mallory says so")
    result, applied = accept(syncer, applied)
    assert (result.reason, result.head) == ("SignatureRefused", unsigned)
    world.work.reset(removal)
    world.work.push(force=True)

    # A signed, approving commit on top lets it through.
    approval = world.push(
        "approve dropping db", sign="alice", trailer="Approve-Destructive: db moved (alice)"
    )
    result, applied = accept(syncer, applied)
    assert result.reason == "Accepted" and commit_of(applied) == approval
    assert f"approved by commit {approval[:12]} (Approve-Destructive: db moved (alice), signed by alice)" in (
        result.message
    )

    # A mass deletion opened by raising the guard: held; an approval *before* it does not cover it.
    world.config(policy_doc("web", retention="{keep_last: 2}"), max_deletions=5)
    world.push("shorter retention", sign="alice", trailer="Approve-Destructive: only the retention")
    world.config(policy_doc("web", retention="{keep_last: 2}"), max_deletions=50)
    raised = world.push("raise the guard", sign="alice")
    result, applied = accept(syncer, applied)
    assert (result.reason, result.head) == ("NeedsApproval", raised)
    assert result.message.startswith(
        "repository 'nas': 8 restore points would be pruned in one run, more than max_deletions_per_run 5 of"
        " the applied config (raised to 50)"
    )
    approved = world.push("go", sign="alice", trailer="Approve-Destructive: yes, 8 points (alice)")
    result, applied = accept(syncer, applied)
    assert result.reason == "Accepted" and commit_of(applied) == approved
    assert point_count(world.backups) == 12  # approval only lets the daemon's plan prune; nothing yet


# -- plan --revision ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("restore_logging")
def test_plan_of_a_branch_against_reality_and_as_a_review(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    make_points(world.backups, "web", 6)
    world.config(policy_doc("web", retention="{keep_last: 10}"))
    main = world.work.commit("main")
    world.work.git("checkout", "-q", "-b", "shorter")
    world.config(policy_doc("web", retention="{keep_last: 4}"))
    branch = world.work.commit("keep four")
    world.work.git("checkout", "-q", "main")
    (world.work.directory / "esxi" / "policies.yaml").write_text("uncommitted: [junk")  # never read
    config = str(world.work.directory / "esxi")
    base = ["--log-level", "error", "--config", config, "--state-dir", str(world.state), "plan"]

    # Exit 1: the config's host answers nowhere, so the plan is incomplete (the repository's part is whole).
    assert cli.main([*base, "--revision", "shorter"]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "esxi-reconciler plan: incomplete: host esxi1:" in captured.err
    assert out.startswith(f"Planning shorter (git:{branch[:12]}) against reality observed now.\n")
    assert (
        len(re.findall(r"^  - point web01@\S+ of web in nas \(retention: beyond keep-last 4\)$", out, re.M))
        == 2
    )
    assert "  - unreferenced data in nas (free the data of 2 pruned points)" in out
    assert "Compared with" not in out

    assert cli.main([*base, "--revision", "shorter", "--against", "main", "--format", "markdown"]) == 1
    markdown = capsys.readouterr().out
    assert markdown.startswith(f"### esxi-reconciler plan for `shorter (git:{branch[:12]})`\n")
    assert (
        f"**Config changes against `main (git:{main[:12]})`:**\n- BackupPolicy 'web' changed (retention)\n"
        in markdown
    )
    assert "**0 to add, 0 to change, 3 to destroy.**" in markdown
    assert "#### Destroy (3): restore points pruned" in markdown
    assert "Needs approval" not in markdown
    assert "#### Not observed (1): the plan is incomplete\n- host esxi1:" in markdown

    assert (
        cli.main(
            [*base, "--revision", "shorter", "--against", "main", "--format", "json", "--detailed-exitcode"]
        )
        == 3
    )
    doc = json.loads(capsys.readouterr().out)
    valid_json("plan", doc)
    assert doc["complete"] is False
    assert doc["revision"] == f"git:{branch}" and doc["review"]["needs_approval"] is False
    assert [a["kind"] for a in doc["actions"]] == ["prune", "prune", "gc"]

    assert cli.main([*base, "--revision", "nope"]) == 64
    assert "no commit named 'nope'" in capsys.readouterr().err
    assert point_count(world.backups) == 6  # planning changes nothing


@pytest.mark.usefixtures("restore_logging")
def test_plan_source_reviews_the_fetched_head_against_the_applied_revision(
    world: World, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    make_points(world.backups, "db", 3)
    world.config(policy_doc("web"), policy_doc("db"))
    applied = world.push("two policies", sign="alice")
    source = world.source(signers=[("alice", "ssh", keys.ssh_public("alice"))])
    common = ["--state-dir", str(world.state), "--log-level", "error"]
    assert cli.main([*common, "run", "--once", "--source", str(source)]) == 1  # the host is Stalled
    world.config(policy_doc("web"))
    held = world.push("drop db", sign="alice")
    assert cli.main([*common, "run", "--once", "--source", str(source)]) == 1  # the applied one runs

    assert cli.main([*common, "plan", "--source", str(source)]) == 1  # incomplete: the host is unreachable
    out = capsys.readouterr().out
    assert out.startswith(f"Planning the fetched branch main (git:{held[:12]}) against reality observed now.")
    assert f"Compared with the applied revision (git:{applied[:12]}):\n  BackupPolicy 'db' removed\n" in out
    assert "NEEDS APPROVAL" in out and "its 3 restore points in repository 'nas' become orphaned" in out
    assert "The daemon refused this revision: NeedsApproval: BackupPolicy 'db' is removed" in out


def test_a_tag_is_followed_and_a_linked_config_directory_refused(world: World) -> None:
    world.config(policy_doc("web"))
    first = world.work.commit("first")
    world.work.git("tag", "production")
    world.work.push(ref="refs/tags/production")
    source = world.root / "tag.yaml"
    source.write_text(source_doc(world.url).replace("branch: main", "tag: production"))
    syncer = Syncer(load_source(source), world.state)
    syncer.open()
    result, applied = accept(syncer, None)
    assert result.reason == "Accepted" and commit_of(applied) == first

    (world.work.directory / "linked").symlink_to("/etc")
    second = world.work.commit("a link as the config directory")
    world.work.git("tag", "-f", "production")
    world.work.push(ref="refs/tags/production", force=True)
    linked = world.root / "linked.yaml"
    linked.write_text(source_doc(world.url, path="linked").replace("branch: main", "tag: production"))
    other = Syncer(load_source(linked), world.root / "other-state")
    other.open()
    result = other.poll(None)
    assert (result.reason, result.head) == ("InvalidConfig", second)
    assert result.message == f"linked is not a directory in commit {second[:12]} (the source's spec.path)"


@pytest.mark.usefixtures("restore_logging")
def test_a_signer_key_gpg_cannot_read_stops_the_daemon_at_start(world: World) -> None:
    world.config(policy_doc("web"))
    world.push("first")
    broken = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PUBLIC KEY BLOCK-----"
    source = world.source(signers=[("carol", "openpgp", broken)])
    syncer = Syncer(load_source(source), world.state)
    with pytest.raises(TrustError, match="signer 'carol': not a usable OpenPGP public key"):
        syncer.open()
    assert (
        cli.main(["--state-dir", str(world.state), "--log-level", "critical", "run", "--source", str(source)])
        == 78
    )
