"""The status store: run history with backoff, action log, plans, conditions, concurrent readers."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.planning.actions import Outcome, Plan, PrunePoint, RunBackup, RunVerify
from reconciler.planning.observed import backup_key, verify_key
from reconciler.status.backoff import BASE, MAXIMUM, retry_delay
from reconciler.status.conditions import Condition
from reconciler.status.store import StatusStore, StatusStoreError, read_history, status_path

UTC = timezone.utc
T0 = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)
REV = "git:" + "a" * 40


def backup(vm: str = "web01", policy: str = "daily") -> RunBackup:
    return RunBackup(reason="due", policy=policy, host_name="esxi1", vm=vm, vmid="1", repository="nas")


def outcome(
    action: RunBackup | RunVerify | PrunePoint,
    status: str = "ok",
    *,
    at: datetime = T0,
    error: str | None = None,
    transient: bool = True,
) -> Outcome:
    return Outcome(
        action=action,
        status=status,  # type: ignore[arg-type]
        started=at,
        finished=at + timedelta(minutes=5),
        error=error,
        transient=transient,
        detail={"point": "p1"} if status == "ok" else {},
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StatusStore]:
    with StatusStore.open(status_path(tmp_path)) as s:
        yield s


def test_success_records_start_and_success(store: StatusStore) -> None:
    store.record_outcome(outcome(backup()), REV)

    record = store.history()[backup_key("daily", "esxi1", "web01")]
    assert record.last_started == T0
    assert record.last_succeeded == T0 + timedelta(minutes=5)
    assert record.consecutive_failures == 0
    assert record.retry_after is None


def test_failures_count_up_back_off_and_success_resets(store: StatusStore) -> None:
    rng = random.Random(1)
    key = backup_key("daily", "esxi1", "web01")
    store.record_outcome(outcome(backup(), "failed", error="host down"), REV, rng=rng)
    first = store.history()[key]
    assert first.consecutive_failures == 1
    assert first.last_error == "host down"
    assert first.last_started == T0  # a failed attempt counts as a start for the schedule
    assert first.retry_after is not None
    finished = T0 + timedelta(minutes=5)
    assert finished < first.retry_after <= finished + BASE

    later = T0 + timedelta(hours=1)
    store.record_outcome(outcome(backup(), "failed", at=later, error="still down"), REV, rng=rng)
    second = store.history()[key]
    assert second.consecutive_failures == 2
    assert second.retry_after is not None
    # Jitter only shortens a step by up to a fifth, so the second wait is always longer than the first.
    assert second.retry_after - (later + timedelta(minutes=5)) > first.retry_after - finished

    store.record_outcome(outcome(backup(), at=later + timedelta(hours=1)), REV)
    cleared = store.history()[key]
    assert (cleared.consecutive_failures, cleared.retry_after, cleared.last_error) == (0, None, None)


def test_backoff_doubles_up_to_the_maximum() -> None:
    delays = [retry_delay(n, rng=random.Random(0)) for n in range(1, 12)]
    assert delays[0] <= BASE
    assert all(b > a for a, b in itertools.pairwise(delays[:9]))
    assert delays[-1] <= MAXIMUM
    assert delays[-1] >= MAXIMUM * 0.8
    assert retry_delay(1, terminal=True) == MAXIMUM


def test_terminal_failure_waits_until_the_config_revision_changes(store: StatusStore) -> None:
    key = backup_key("daily", "esxi1", "web01")
    store.record_outcome(outcome(backup(), "failed", error="bad password", transient=False), REV)

    held = store.history(REV)[key]
    assert held.retry_after == T0 + timedelta(minutes=5) + MAXIMUM
    released = store.history("git:" + "b" * 40)[key]
    assert released.retry_after is None
    assert released.consecutive_failures == 1  # still shown as failing until it succeeds


def test_verify_outcomes_use_the_verify_key_and_skips_change_nothing(store: StatusStore) -> None:
    verify = RunVerify(reason="due", verify_policy="weekly-check", repository="nas", read_data_percent=10)
    store.record_outcome(outcome(verify), REV)
    store.record_outcome(outcome(backup(), "skipped", error="cancelled"), REV)

    history = store.history()
    assert set(history) == {verify_key("weekly-check")}
    assert [(e.kind, e.status) for e in store.actions()] == [("backup", "skipped"), ("verify", "ok")]


def test_action_log_keeps_every_outcome_newest_first(store: StatusStore) -> None:
    prune = PrunePoint(reason="expired", repository="nas", point_id="p9", policy="daily", vm="web01", time=T0)
    store.record_outcome(outcome(backup()), REV)
    store.record_outcome(outcome(prune, "failed", error="locked"), REV)

    entries = store.actions()
    assert [e.kind for e in entries] == ["prune", "backup"]
    assert entries[0].subject == prune.subject
    assert entries[0].error == "locked"
    assert entries[0].revision == REV
    assert entries[1].detail == {"point": "p1"}
    assert [e.kind for e in store.actions(status="failed")] == ["prune"]


def test_plans_are_recorded_and_the_last_one_read_back(store: StatusStore) -> None:
    assert store.last_plan() is None
    plan = Plan(
        created=T0,
        revision=REV,
        observed_fingerprint="f",
        actions=(backup(),),
        next_due=T0 + timedelta(days=1),
    )
    store.record_plan(plan)

    last = store.last_plan()
    assert last is not None
    assert (last.time, last.revision, last.actions, last.notices) == (T0, REV, 1, 0)
    assert last.next_due == T0 + timedelta(days=1)
    assert Plan.from_json(json.dumps(last.plan)) == plan


def test_conditions_round_trip_and_replace_keeps_asked_kinds(store: StatusStore) -> None:
    config = Condition(
        "config", "config", "Stalled", "InvalidConfig", "a.yaml:3:1 x: bad", revision=REV, updated=T0
    )
    vm = Condition("vm", "esxi1/web01", "Ready", "UpToDate", "ok", last_success=T0, next_due=T0, updated=T0)
    store.set_condition(config)
    store.replace_conditions([vm], keep_kinds=("config",))
    assert store.conditions() == [config, vm]

    store.replace_conditions([], keep_kinds=("config",))
    assert store.conditions() == [config]


def test_a_reader_sees_the_writer_s_data_while_it_writes(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    writer = StatusStore.open(path)
    writer.record_outcome(outcome(backup()), REV)
    reader = StatusStore.open(path, readonly=True)
    try:
        errors: list[BaseException] = []

        def write_more() -> None:
            try:
                for i in range(50):
                    writer.record_outcome(outcome(backup(f"vm{i}")), REV)
            except BaseException as exc:  # pragma: no cover  # noqa: BLE001  collected here, asserted below
                errors.append(exc)

        thread = threading.Thread(target=write_more)
        thread.start()
        seen = [len(reader.history()) for _ in range(50)]
        thread.join()
        assert not errors
        assert min(seen) >= 1
        assert len(reader.history()) == 51
        with pytest.raises(StatusStoreError, match="read-only"):
            reader.record_outcome(outcome(backup()), REV)
    finally:
        reader.close()
        writer.close()
    assert read_history(tmp_path)[backup_key("daily", "esxi1", "web01")].last_succeeded is not None


def test_read_only_open_of_a_missing_file_and_history_of_a_fresh_state_dir(tmp_path: Path) -> None:
    with pytest.raises(StatusStoreError, match="no status recorded yet"):
        StatusStore.open(status_path(tmp_path), readonly=True)
    assert read_history(tmp_path) == {}


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    StatusStore.open(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StatusStoreError, match="schema version 99"):
        StatusStore.open(path)
