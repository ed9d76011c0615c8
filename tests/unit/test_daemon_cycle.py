"""The real cycle's wiring (history -> observe -> plan -> record -> apply -> outcomes -> conditions),
with observe, plan and apply replaced by fakes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import DesiredState
from reconciler.daemon import CycleContext, reconcile
from reconciler.operations import apply as apply_module
from reconciler.operations import observe as observe_module
from reconciler.planning import plan as plan_module
from reconciler.planning.actions import Outcome, Plan, RunBackup
from reconciler.planning.observed import ObservedState, RunRecord, backup_key
from reconciler.status.store import StatusStore, status_path
from tests.unit.planfixtures import at, host, load_desired, observed, policy_doc, vm

NOW = at("2026-11-26 03:00")
KEY = backup_key("web-daily", "esxi1", "web01")


def test_a_cycle_records_the_plan_each_outcome_and_the_conditions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    desired = load_desired(tmp_path, policy_doc("web-daily", "esxi1", ["web01"]))
    action = RunBackup(
        reason="due since 02:00",
        policy="web-daily",
        host_name="esxi1",
        vm="web01",
        vmid="1",
        repository="nas",
    )
    the_plan = Plan(
        created=NOW, revision=desired.revision.id, observed_fingerprint="f", actions=(action,), next_due=NOW
    )
    seen: dict[str, Any] = {}

    def fake_observe(d: DesiredState, *, now: datetime, history: Mapping[str, RunRecord]) -> ObservedState:
        seen["history"] = dict(history)
        return observed(now, [host("esxi1", [vm("web01")]), host("esxi2", [])], history=history)

    def fake_apply(
        p: Plan,
        d: DesiredState,
        *,
        cancel: threading.Event,
        on_outcome: Callable[[Outcome], None],
        clock: Callable[[], datetime],
    ) -> list[Outcome]:
        with StatusStore.open(status_path(tmp_path), readonly=True) as reader:
            # The plan and the "due" conditions are recorded before anything runs.
            seen["before"] = {c.name: c.status for c in reader.conditions()}
            seen["plan"] = reader.last_plan()
        outcome = Outcome(action, "failed", NOW, NOW + timedelta(minutes=1), error="snapshot timed out")
        on_outcome(outcome)
        return [outcome]

    monkeypatch.setattr(observe_module, "observe", fake_observe)
    monkeypatch.setattr(plan_module, "plan", lambda d, o: the_plan)
    monkeypatch.setattr(apply_module, "apply", fake_apply)

    with StatusStore.open(status_path(tmp_path)) as store:
        store.record_outcome(Outcome(action, "ok", NOW - timedelta(days=1), NOW - timedelta(days=1)), "old")
        ctx = CycleContext(
            desired=desired, store=store, cancel=threading.Event(), now=NOW, state_dir=tmp_path
        )
        result = reconcile(ctx)

        assert seen["history"][KEY].last_succeeded == NOW - timedelta(days=1)  # history fed to observe
        assert seen["before"]["esxi1/web01"] == "Reconciling"
        assert seen["plan"].actions == 1
        assert store.history()[KEY].consecutive_failures == 1
        conditions = {c.name: c for c in store.conditions()}
        assert (conditions["esxi1/web01"].status, conditions["esxi1/web01"].reason) == (
            "Stalled",
            "BackupFailed",
        )
        assert [e.status for e in store.actions()] == ["failed", "ok"]
    assert not result.ok
    assert result.summary.startswith("0 done, 1 failed, 0 not run")
    assert result.next_due == NOW
