"""``esxi-reconciler verify``: summary and problems on stdout, exit 0 healthy / 1 damaged / 2 bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.repository import Repository
from reconciler.repository.chunks import chunk_name
from tests.unit.test_verify import FAST_KDF, chunk, write_disk, write_point

PASSPHRASE = "correct horse battery staple"

pytestmark = pytest.mark.usefixtures("restore_logging")


def _repository_yaml(name: str, path: Path, key: Path | None) -> str:
    encryption = f"{{enabled: true, key: {{file: {key}}}}}" if key else "{enabled: false}"
    return f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: {name}}}
spec:
  backend: {{type: local, path: {path}}}
  compression: {{algorithm: zstd, level: 3}}
  encryption: {encryption}
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Repository, Repository]:
    """Config with two repositories: ``nas`` (encrypted) and ``usb`` (plain), each with one point."""
    cfg = tmp_path / "config"
    cfg.mkdir()
    key = tmp_path / "nas.key"
    key.write_text(PASSPHRASE + "\n")
    key.chmod(0o600)
    (cfg / "nas.yaml").write_text(_repository_yaml("nas", tmp_path / "nas", key))
    (cfg / "usb.yaml").write_text(_repository_yaml("usb", tmp_path / "usb", None))
    nas = Repository.init(tmp_path / "nas", PASSPHRASE, kdf=FAST_KDF)
    usb = Repository.init(tmp_path / "usb")
    for repo in (nas, usb):
        write_point(repo, "web01", 0, [("Hard disk 1", write_disk(repo, [chunk("a"), None, chunk("b")]))])
    return cfg, nas, usb


def test_healthy_repositories_exit_0(
    setup: tuple[Path, Repository, Repository], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _, _ = setup
    assert main(["verify", "--config", str(cfg), "--log-level", "error"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "repository nas: OK: 1 restore point, 3 chunks present, 3 read (2.0 MiB)",
        "repository usb: OK: 1 restore point, 3 chunks present, 3 read (2.0 MiB)",
    ]


def test_damage_exits_1_and_names_the_points(
    setup: tuple[Path, Repository, Repository], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, nas, _ = setup
    [point] = nas.list_points()
    cid = nas.chunk_id(chunk("b"))
    (nas.path / chunk_name(cid)).unlink()
    assert main(["verify", "nas", "--config", str(cfg), "--log-level", "error"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "repository nas: DAMAGED: 1 problem, 1 restore point affected; 1 restore point, 3 chunks present,"
        " 2 read (1.0 MiB)",
        f"  chunk {cid.hex()[:12]}… is missing: needed by 1 point (web01@2026-11-20T02:00Z disk 'Hard disk 1'"
        " at offset 2 MiB)",
        "  restore points that cannot be fully restored:",
        f"    {point.id}  web01@2026-11-20T02:00Z",
    ]
    assert main(["verify", "usb", "--config", str(cfg), "--log-level", "error"]) == 0


def test_json_output(setup: tuple[Path, Repository, Repository], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _, usb = setup
    [point] = usb.list_points()
    index = usb.read_index(point.disks[0].index)
    damaged = usb.path / chunk_name(index[0])
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"?")
    assert main(["verify", "--json", "--config", str(cfg), "--log-level", "error"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    nas, usb_result = doc["repositories"]
    assert nas["repository"] == "nas" and nas["ok"] is True and nas["problems"] == [] and nas["error"] is None
    assert usb_result["ok"] is False and usb_result["chunks"] == 3 and usb_result["chunks_read"] == 3
    [problem] = usb_result["problems"]
    assert problem["kind"] == "chunk-damaged"
    assert problem["object"] == chunk_name(index[0])
    assert problem["points"] == [point.id]
    assert usb_result["damaged_points"] == [{"id": point.id, "label": "web01@2026-11-20T02:00Z"}]


def test_no_read_data_and_subsets(
    setup: tuple[Path, Repository, Repository], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _, usb = setup
    [point] = usb.list_points()
    damaged = usb.path / chunk_name(usb.read_index(point.disks[0].index)[0])
    damaged.write_bytes(b"not a chunk")
    assert main(["verify", "usb", "--no-read-data", "--config", str(cfg), "--log-level", "error"]) == 0
    assert "3 chunks present, 0 read (0 B)" in capsys.readouterr().out
    codes = [
        main(["verify", "usb", "--read-data-subset", f"{n}/3", "--config", str(cfg), "--log-level", "error"])
        for n in (1, 2, 3)
    ]
    assert sorted(codes) == [0, 0, 1]  # exactly one slice holds the damaged chunk
    out = capsys.readouterr().out
    assert (
        sum(
            int(line.split(" present, ")[1].split(" read")[0])
            for line in out.splitlines()
            if "present" in line
        )
        == 3
    )
    assert (
        main(["verify", "usb", "--read-data-subset", "100%", "--config", str(cfg), "--log-level", "error"])
        == 1
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "nsa"],
        ["verify", "--read-data-subset", "0/3"],
        ["verify", "--read-data-subset", "150%"],
        ["verify", "--no-read-data", "--read-data-subset", "1/2"],
    ],
)
def test_usage_errors_exit_64(
    setup: tuple[Path, Repository, Repository], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    cfg, _, _ = setup
    try:
        code = main([*argv, "--config", str(cfg)])
    except SystemExit as exc:  # argparse
        code = exc.code  # type: ignore[assignment]
    assert code == 64
    err = capsys.readouterr().err
    assert "did you mean 'nas'?" in err if argv[1] == "nsa" else "verify" in err


def test_a_repository_that_cannot_be_opened_exits_1(
    setup: tuple[Path, Repository, Repository], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, nas, _ = setup
    (nas.path / "config").unlink()
    assert main(["verify", "--config", str(cfg), "--log-level", "critical"]) == 1
    captured = capsys.readouterr()
    assert "esxi-reconciler verify: not verified: repository nas (" in captured.err
    assert "not a repository" in captured.err
    assert "repository usb: OK" in captured.out
    assert PASSPHRASE not in captured.out + captured.err


def test_runs_are_recorded_in_an_existing_history(
    setup: tuple[Path, Repository, Repository], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler.status.store import StatusStore, status_path

    cfg, nas, _ = setup
    state = tmp_path / "state"
    args = ["--config", str(cfg), "--state-dir", str(state), "--log-level", "error", "verify"]
    assert main([*args, "nas"]) == 0
    assert not state.exists()  # no status file: nothing created for a record
    StatusStore.open(status_path(state)).close()
    assert main([*args, "nas"]) == 0
    victim = next(p for p in nas.path.glob("chunks/*/*") if p.is_file())
    victim.write_bytes(b"rot")
    assert main([*args, "nas"]) == 1
    assert main([*args, "nosuch"]) == 64  # a usage error attempted nothing: not recorded
    capsys.readouterr()
    with StatusStore.open(status_path(state), readonly=True) as store:
        events = store.events.events()
    assert [(e.kind, e.subject, e.outcome) for e in events] == [
        ("verify", "nas", "failed"),
        ("verify", "nas", "ok"),
    ]
    assert events[1].message == "verify from the command line: done (exit 0)"
    assert events[1].seconds is not None and events[1].seconds >= 0  # TOOK in `history`
    assert events[0].detail["command_line"]["repositories"] == "['nas']"
    assert events[0].detail["exit_code"] == 1
