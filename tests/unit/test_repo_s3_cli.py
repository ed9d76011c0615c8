"""A Repository on S3 in the configuration (backend type s3), ``repo init`` on a bucket, and ``repo copy``
between a local repository and an S3 one, through the CLI against moto's server."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.config import ConfigError, load_config
from reconciler.config.model import S3BackendConfig
from reconciler.operations.repositories import open_repository
from reconciler.repository import Repository
from reconciler.status.store import StatusStore, status_path
from tests.s3server import S3Server
from tests.unit.test_cli_outcomes import check
from tests.unit.test_copy import T0, backup, disk_data, disk_of

PASSPHRASE = "correct horse battery staple"


def _config(
    tmp_path: Path, s3: S3Server, bucket: str, *, extra: str = "", endpoint: str | None = None
) -> Path:
    cfg = tmp_path / "config"
    cfg.mkdir(exist_ok=True)
    key = tmp_path / "pass.key"
    key.write_text(PASSPHRASE + "\n")
    key.chmod(0o600)
    (cfg / "repos.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: {tmp_path / "nas"}}}
  encryption: {{enabled: true, key: {{file: {key}}}}}
---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: offsite}}
spec:
  backend:
    type: s3
    endpoint: {endpoint or s3.endpoint}
    bucket: {bucket}
    prefix: esxi/main
    path_style: true
    credentials:
      access_key_id: {{env: TEST_S3_KEY_ID}}
      secret_access_key: {{env: TEST_S3_SECRET}}
{extra}  encryption: {{enabled: true, key: {{file: {key}}}}}
"""
    )
    return cfg


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> None:
    monkeypatch.setenv("TEST_S3_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("TEST_S3_SECRET", s3_server.secret_key)


def test_the_s3_backend_is_configured_by_reference(tmp_path: Path, s3_server: S3Server) -> None:
    desired = load_config(_config(tmp_path, s3_server, "bucket-a"))
    backend = desired.repository("offsite").backend
    assert isinstance(backend, S3BackendConfig)
    assert backend.url == "s3://bucket-a/esxi/main"
    assert backend.path_style and backend.region == "us-east-1"
    assert backend.credentials is not None
    assert repr(backend.credentials.secret_access_key) == "Secret(env:TEST_S3_SECRET)"
    assert any("INSECURE: plain HTTP" in str(w) for w in desired.warnings)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    path: /srv/x\n", "spec.backend.path: only for type local"),
        (
            "    tls: {insecure_skip_verify: true, ca_file: /etc/ca.pem}\n",
            "contradicts the pinned tls.ca_file",
        ),
        ("    bucket_name: x\n", "bucket_name"),
    ],
)
def test_bad_s3_backends_are_refused(tmp_path: Path, s3_server: S3Server, extra: str, message: str) -> None:
    cfg = _config(tmp_path, s3_server, "bucket-a")
    text = (
        (cfg / "repos.yaml").read_text().replace("    path_style: true\n", "    path_style: true\n" + extra)
    )
    (cfg / "repos.yaml").write_text(text)
    with pytest.raises(ConfigError) as failed:
        load_config(cfg)
    assert message in str(failed.value) or any(message in str(i) for i in failed.value.issues)


def test_two_repositories_in_one_prefix_are_refused(tmp_path: Path, s3_server: S3Server) -> None:
    cfg = _config(tmp_path, s3_server, "bucket-a")
    text = (cfg / "repos.yaml").read_text()
    second = text.split("---\n")[1].replace("name: offsite", "name: offsite2").replace("esxi/main", "esxi")
    (cfg / "more.yaml").write_text(second)
    with pytest.raises(ConfigError) as failed:
        load_config(cfg)
    assert any("overlaps Repository" in str(i) for i in failed.value.issues)


@pytest.mark.usefixtures("s3_env", "restore_logging")
def test_init_and_copy_through_the_cli(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, s3_server, s3_bucket)
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    assert main(["--config", str(cfg), "--json", "repo", "init", "offsite"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out[out.index("{") :])
    assert doc["path"] == f"s3://{s3_bucket}/esxi/main at {s3_server.endpoint}"
    assert main(["--config", str(cfg), "repo", "init", "offsite"]) == 1  # exists: refused
    assert "already a repository" in capsys.readouterr().err

    desired = load_config(cfg)
    nas = open_repository(desired.repository("nas"))
    with nas.lock():
        web = backup(nas, "web01", disk_data(5), T0)
        db = backup(nas, "db01", disk_data(6), datetime(2026, 12, 3, tzinfo=timezone.utc))

    assert main(["--config", str(cfg), "--json", "repo", "copy", "nas", "offsite", "--vm", "web*"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    check("repo-copy", result)
    assert result["copied"] == 1 and result["reencrypted"] is True
    assert "copied web01@2026-12-01 02:00 UTC" in captured.err

    assert main(["--config", str(cfg), "repo", "copy", "nas", "offsite", "--since", "2026-12-02"]) == 0
    text = capsys.readouterr().out
    assert "copied db01@2026-12-03" in text and "web01" not in text.split("\n")[0]
    offsite = open_repository(desired.repository("offsite"))
    assert disk_of(offsite, web.id) == disk_data(5)
    assert disk_of(offsite, db.id) == disk_data(6)

    # points listed and verified straight from object storage
    assert main(["--config", str(cfg), "--json", "points"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {p["vm"] for p in listed if p["repository"] == "offsite"} == {"web01", "db01"}
    assert main(["--config", str(cfg), "--json", "verify", "offsite"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.usefixtures("s3_env", "restore_logging")
def test_copy_refuses_bad_input_with_one_line(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, s3_server, s3_bucket)
    Repository.init(tmp_path / "nas", PASSPHRASE)
    base = ["--config", str(cfg), "repo", "copy"]
    assert main([*base, "nas", "nas"]) == 64
    assert "same repository" in capsys.readouterr().err
    assert main([*base, "nas", "offsit"]) == 64
    assert "offsite" in capsys.readouterr().err  # did you mean
    with pytest.raises(SystemExit) as usage:
        main([*base, "nas", "offsite", "--since", "yesterday"])
    assert usage.value.code == 64
    assert "neither an age (7d, 24h) nor a date/time" in capsys.readouterr().err
    # the bucket has no repository yet
    assert main([*base, "nas", "offsite"]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a repository: nothing is stored under that prefix" in err
    assert "\n" not in err


@pytest.mark.usefixtures("restore_logging")
def test_an_unreachable_store_is_one_line(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.s3server import free_port

    monkeypatch.setenv("TEST_S3_KEY_ID", "x")
    monkeypatch.setenv("TEST_S3_SECRET", "y")
    cfg = _config(tmp_path, s3_server, "bucket-x", endpoint=f"http://127.0.0.1:{free_port()}")
    Repository.init(tmp_path / "nas", PASSPHRASE)
    assert main(["--config", str(cfg), "--json", "repo", "copy", "nas", "offsite"]) == 1
    captured = capsys.readouterr()
    assert "cannot reach the object store" in captured.err
    check("error", json.loads(captured.out))


@pytest.mark.usefixtures("s3_env", "restore_logging")
def test_a_copy_policy_is_planned_and_run_by_the_daemon(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, s3_server, s3_bucket)
    (cfg / "copy.yaml").write_text(
        """apiVersion: esxi-reconciler/v1
kind: CopyPolicy
metadata: {name: nas-offsite}
spec:
  source: nas
  destination: offsite
  schedule: {every: 1h}
  retention: {keep_last: 1}
"""
    )
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    assert main(["--config", str(cfg), "repo", "init", "offsite"]) == 0
    desired = load_config(cfg)
    nas = open_repository(desired.repository("nas"))
    with nas.lock():
        old = backup(nas, "web01", disk_data(5), T0)
        new = backup(nas, "web01", disk_data(5, changed=1), datetime(2026, 12, 2, 2, tzinfo=timezone.utc))
    capsys.readouterr()

    assert main(["--config", str(cfg), "plan"]) == 0
    shown = capsys.readouterr().out
    # keep_last 1 in the destination: only the newest point travels
    assert "+ copy nas -> offsite by nas-offsite: 1 point (" in shown and "Plan: 1 copy;" in shown

    state = tmp_path / "state"
    assert main(["--config", str(cfg), "--state-dir", str(state), "--json", "run", "--once"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    offsite = open_repository(desired.repository("offsite"))
    assert offsite.point_ids() == [new.id] and old.id not in offsite.point_ids()
    assert disk_of(offsite, new.id) == disk_of(nas, new.id)

    # the run history holds the copy's run, so the next cycle within the hour has nothing to do
    with StatusStore.open(status_path(state), readonly=True) as store:
        record = store.history()["copy/nas-offsite"]
    assert record.last_succeeded is not None and record.consecutive_failures == 0
    assert main(["--config", str(cfg), "--state-dir", str(state), "plan"]) == 0
    assert "copy nas -> offsite" not in capsys.readouterr().out
