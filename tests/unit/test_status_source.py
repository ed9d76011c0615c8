"""The git source in the status: its revisions, its condition, and the store's table."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from reconciler.status.source import SourceStatus, source_condition
from reconciler.status.store import StatusStore, status_path

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=timezone.utc)
A = "a" * 40
B = "b" * 40


def fresh() -> SourceStatus:
    return SourceStatus("config", "ssh://git@git.example.com/esxi.git", "branch main", "esxi", True)


def test_nothing_fetched_yet_is_reconciling() -> None:
    condition = source_condition(fresh(), T0)
    assert (condition.kind, condition.name, condition.status, condition.reason) == (
        "source",
        "config",
        "Reconciling",
        "Fetching",
    )


def test_applied_head_is_ready_and_names_its_signer() -> None:
    status = fresh().fetch_ok(A, T0).now_applied(A, "alice", T0)
    condition = source_condition(status, T0)
    assert (condition.status, condition.reason, condition.revision) == ("Ready", "Applied", f"git:{A}")
    assert condition.message == "aaaaaaaaaaaa of branch main applied, signed by alice"


def test_a_failing_fetch_says_since_when_and_what_stays_applied() -> None:
    status = fresh().fetch_ok(A, T0).now_applied(A, None, T0)
    status = status.fetch_failed("fetching: ssh: connect refused", T0 + timedelta(minutes=1))
    status = status.fetch_failed("fetching: ssh: connect refused", T0 + timedelta(minutes=2))
    condition = source_condition(status, T0 + timedelta(minutes=2))
    assert (condition.status, condition.reason) == ("Stalled", "FetchFailed")
    assert condition.message == (
        "fetch failing since 2026-11-26 09:01Z: fetching: ssh: connect refused; aaaaaaaaaaaa stays applied"
    )
    recovered = status.fetch_ok(A, T0 + timedelta(minutes=3))
    assert source_condition(recovered, T0).status == "Ready" and recovered.fetch_failing_since is None


def test_a_refused_head_is_stalled_while_it_is_the_head_and_stays_as_last_failed() -> None:
    status = fresh().fetch_ok(A, T0).now_applied(A, None, T0)
    status = status.fetch_ok(B, T0).refused(B, "SignatureRefused", "not signed", T0)
    again = status.refused(B, "SignatureRefused", "not signed", T0 + timedelta(minutes=5))
    assert again.failed_at == T0  # the same verdict keeps its first time
    condition = source_condition(again, T0)
    assert (condition.status, condition.reason) == ("Stalled", "SignatureRefused")
    assert condition.message == "bbbbbbbbbbbb not applied: not signed; aaaaaaaaaaaa stays applied"
    newer = "c" * 40
    moved_on = again.fetch_ok(newer, T0).now_applied(newer, None, T0)
    assert source_condition(moved_on, T0).status == "Ready"
    assert moved_on.failed == B  # the last failed revision stays shown
    approved_later = again.now_applied(B, None, T0)
    assert approved_later.failed is None


def test_the_store_keeps_the_source_and_forgets_it(tmp_path: Path) -> None:
    status = fresh().fetch_ok(A, T0).now_applied(A, "alice", T0).warn("history rewritten", T0)
    with StatusStore.open(status_path(tmp_path)) as store:
        assert store.source_status() is None
        store.record_source(status, T0)
        store.set_condition(source_condition(status, T0))
    with StatusStore.open(status_path(tmp_path), readonly=True) as store:
        assert store.source_status() == status
        assert [c.kind for c in store.conditions()] == ["source"]
    with StatusStore.open(status_path(tmp_path)) as store:
        store.forget_source()
        assert store.source_status() is None and store.conditions() == []
