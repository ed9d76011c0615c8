"""``points protect|unprotect|forget``: against a real repository, with the planner and prune reading the
flag the verbs write."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.config import load_config
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.operations.prune import prune
from reconciler.planning.actions import PrunePoint
from reconciler.planning.observed import ObservedState, RepositoryObservation
from reconciler.planning.plan import plan
from reconciler.repository import CHUNK_SIZE, Repository
from reconciler.repository.chunks import chunk_name
from tests.unit.planfixtures import host, vm
from tests.unit.test_cli_outcomes import check

pytestmark = pytest.mark.usefixtures("restore_logging")

T0 = datetime(2026, 11, 20, 2, 0, tzinfo=timezone.utc)


def write_config(tmp_path: Path) -> Path:
    """A config with one unencrypted repository, one host and a policy keeping the last point."""
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "all.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: {tmp_path / "repo"}}}
  encryption: {{enabled: false}}
  prune: {{enabled: true}}
---
apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: esxi1}}
spec:
  address: esxi1.lan
  license: free
  credentials: {{user: root, password: {{env: PW}}}}
  api: {{thumbprint: "{":".join(["AB"] * 32)}"}}
  ssh: {{host_key: "SHA256:glTDKakoUPbVOd03b0gW7idkUX2l4CNVFK9DMWRIDXo"}}
---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: nightly}}
spec:
  host: esxi1
  repository: nas
  vms: {{names: [web01]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_last: 1}}
"""
    )
    Repository.init(tmp_path / "repo")
    return cfg


def add_point(repo: Repository, days: int, vm: str = "web01") -> RestorePoint:
    """A point of a one-chunk disk whose content is its own (so forgetting it leaves its chunk unused)."""
    when = T0 + timedelta(days=days)
    writer = repo.chunk_writer(CHUNK_SIZE)
    writer.write(0, (f"{vm} day {days} ".encode() * CHUNK_SIZE)[:CHUNK_SIZE])
    point = RestorePoint(
        id=new_point_id(when),
        policy="nightly",
        vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
        started=when,
        snapshot_time=when,
        finished=when,
        status="success",
        mode="full",
        config_revision="r",
        disks=(DiskRecord(2000, "Hard disk 1", "[ds1] x.vmdk", CHUNK_SIZE, writer.finish()),),
    )
    repo.write_point(point)
    return point


def planned_prunes(cfg: Path, repo: Repository) -> set[str]:
    """The point ids the planner would prune now, from the repository as it is."""
    desired = load_config(cfg)
    observed = ObservedState(
        time=T0 + timedelta(days=30),
        hosts={"esxi1": host("esxi1", [vm("web01")])},
        repositories={"nas": RepositoryObservation("nas", reachable=True, points=tuple(repo.list_points()))},
        history={},
    )
    return {a.point_id for a in plan(desired, observed).actions if isinstance(a, PrunePoint)}


def run(cfg: Path, *argv: str) -> int:
    return main(["--config", str(cfg), "--log-format", "json", *argv])


def test_protect_and_unprotect_round_trip_and_the_planner_and_prune_obey(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    repo = Repository.open(tmp_path / "repo")
    old, middle, newest = add_point(repo, 0), add_point(repo, 1), add_point(repo, 2)
    assert planned_prunes(cfg, repo) == {old.id, middle.id}  # keep_last: 1

    assert run(cfg, "points", "protect", old.id) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"protected: restore point {old.id} of VM 'web01' (on esxi1, policy nightly,")
    assert repo.read_point(old.id).protected
    assert planned_prunes(cfg, repo) == {middle.id}
    results = prune(repo, [old.id, middle.id], max_deletions=10)
    assert [(r.point_id, r.decision) for r in results] == [(old.id, "refused"), (middle.id, "deleted")]

    assert run(cfg, "points", "protect", old.id, "--json") == 0  # again: nothing changes, still 0
    doc = json.loads(capsys.readouterr().out)
    check("points-protect", doc)
    assert doc["ok"] is True
    assert [(p["id"], p["protected"], p["changed"], p["vm"]) for p in doc["points"]] == [
        (old.id, True, False, "web01")
    ]
    assert run(cfg, "points") == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[-1] == "PROT"
    assert next(line for line in listing if old.id in line).split()[-1] == "yes"

    assert run(cfg, "points", "unprotect", old.id) == 0
    assert capsys.readouterr().out.startswith(f"unprotected: restore point {old.id}")
    assert not repo.read_point(old.id).protected
    assert planned_prunes(cfg, repo) == {old.id}
    assert newest.id in repo.point_ids()


def test_unknown_points_and_repositories_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    point = add_point(Repository.open(tmp_path / "repo"), 0)
    missing = "20200101T000000000000Z-00000000"
    assert run(cfg, "points", "protect", point.id, missing) == 64
    err = capsys.readouterr().err
    assert f"no restore point '{missing}' in nas" in err
    assert not Repository.open(tmp_path / "repo").read_point(point.id).protected  # all or nothing
    assert run(cfg, "points", "forget", point.id, "--repository", "usb") == 64
    assert "no Repository named 'usb'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # ID is required: argparse says so
        run(cfg, "points", "forget")
    assert exit_.value.code == 64
    assert "required: ID" in capsys.readouterr().err


def test_forget_refuses_the_newest_successful_point_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    repo = Repository.open(tmp_path / "repo")
    old, newest = add_point(repo, 0), add_point(repo, 1)
    other_vm = add_point(repo, 0, vm="db01")  # its VM's only point

    assert run(cfg, "points", "forget", old.id, newest.id, "--yes") == 64
    err = capsys.readouterr().err
    assert f"restore point {newest.id} is the newest successful point of VM 'web01'" in err
    assert "give --force" in err and "nothing was forgotten" in err
    assert set(repo.point_ids()) == {old.id, newest.id, other_vm.id}  # not even the old one went

    assert run(cfg, "points", "forget", newest.id, "--force", "--yes", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    check("points-forget", doc)
    assert doc == {
        "ok": True,
        "points": [
            {
                "id": newest.id,
                "repository": "nas",
                "policy": "nightly",
                "vm": "web01",
                "host": "esxi1",
                "uuid": "uuid-web01",
                "time": newest.snapshot_time.isoformat(),
                "status": "success",
                "protected": False,
                "decision": "deleted",
                "reason": None,
            }
        ],
        "gc": None,
    }
    assert set(repo.point_ids()) == {old.id, other_vm.id}
    # old is now web01's newest: refused in turn
    assert run(cfg, "points", "forget", old.id, "--yes", "--json") == 64
    captured = capsys.readouterr()
    assert "newest successful point of VM 'web01'" in captured.err
    doc = json.loads(captured.out)
    check("error", doc)
    assert (doc["error"]["code"], doc["error"]["exit_code"]) == ("newest-point", 64)


def test_forget_refuses_protected_points_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    repo = Repository.open(tmp_path / "repo")
    old = add_point(repo, 0)
    add_point(repo, 1)
    repo.set_protected(old.id, True)
    assert run(cfg, "points", "forget", old.id, "--force", "--yes") == 64
    assert f"points unprotect {old.id}` first" in capsys.readouterr().err
    assert old.id in repo.point_ids()


class Terminal(io.StringIO):
    """Standard input that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_forget_asks_and_refuses_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path)
    repo = Repository.open(tmp_path / "repo")
    old = add_point(repo, 0)
    add_point(repo, 1)

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    assert run(cfg, "points", "forget", old.id) == 64
    captured = capsys.readouterr()
    assert "not asking without a terminal (or with --json): pass --yes; nothing was forgotten" in captured.err
    assert f"restore point {old.id}" in captured.out  # what would go was shown
    assert old.id in repo.point_ids()
    monkeypatch.setattr("sys.stdin", Terminal(""))
    assert run(cfg, "points", "forget", old.id, "--json") == 64  # --json never asks
    doc = json.loads(capsys.readouterr().out)
    check("error", doc)
    assert (doc["error"]["code"], doc["error"]["exit_code"]) == ("not-confirmed", 64)

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert run(cfg, "points", "forget", old.id) == 1  # declined
    assert "Forget 1 restore point for good? [y/N]" in (err := capsys.readouterr().err)
    assert "not confirmed; nothing was forgotten" in err
    assert old.id in repo.point_ids()

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert run(cfg, "points", "forget", old.id) == 0
    out = capsys.readouterr().out
    assert f"forgotten: restore point {old.id}" in out
    assert "their data stays in the repository until garbage collection: esxi-reconciler repo gc nas" in out
    assert old.id not in repo.point_ids()


def test_forget_frees_nothing_until_gc_and_gc_frees_its_chunk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    repo = Repository.open(tmp_path / "repo")
    first, second, third = add_point(repo, 0), add_point(repo, 1), add_point(repo, 2)

    def chunk_of(point: RestorePoint) -> Path:
        return repo.path / chunk_name(repo.read_index(point.disks[0].index)[0])

    first_chunk, second_chunk = chunk_of(first), chunk_of(second)
    assert run(cfg, "points", "forget", first.id, "--yes") == 0
    capsys.readouterr()
    assert first_chunk.exists()  # forgetting alone frees nothing

    assert run(cfg, "points", "forget", second.id, "--yes", "--gc") == 0
    out = capsys.readouterr().out
    assert f"forgotten: restore point {second.id}" in out
    assert "repository nas (" in out and "removed 2 chunks" in out
    assert not first_chunk.exists() and not second_chunk.exists()
    assert chunk_of(third).exists()
    assert repo.point_ids() == [third.id]
