"""``esxi-reconciler repo init`` and ``repo key-export``: create the configured repository, save its key."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.repository import Repository, WrongKeyError, import_key

PASSPHRASE = "correct horse battery staple"


def _config(tmp_path: Path, *, encrypted: bool = True, level: int = 5) -> Path:
    cfg = tmp_path / "config"
    cfg.mkdir()
    key = tmp_path / "nas.key"
    key.write_text(PASSPHRASE + "\n")
    key.chmod(0o600)
    encryption = f"{{enabled: true, key: {{file: {key}}}}}" if encrypted else "{enabled: false}"
    (cfg / "repo.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: {tmp_path / "repo"}}}
  compression: {{algorithm: zstd, level: {level}}}
  encryption: {encryption}
"""
    )
    return cfg


def test_init_creates_the_configured_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    assert main(["repo", "init", "nas", "--config", str(cfg), "--log-format", "json"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"created repository nas at {tmp_path / 'repo'}: id ")
    assert "encrypted (AES-256-GCM" in out
    assert "zstd level 5" in out
    assert "repo key export nas" in out
    assert PASSPHRASE not in out + err
    config = json.loads((tmp_path / "repo" / "config").read_text())
    assert config["encryption"] == "aes-256-gcm"
    assert config["compression"] == {"algorithm": "zstd", "level": 5}
    repo = Repository.open(tmp_path / "repo", PASSPHRASE, expect_encrypted=True)
    assert repo.encrypted
    with pytest.raises(WrongKeyError):
        Repository.open(tmp_path / "repo", "not the passphrase")


def test_init_unencrypted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, encrypted=False, level=9)
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    assert "NOT encrypted, zstd level 9" in capsys.readouterr().out
    assert not Repository.open(tmp_path / "repo", expect_encrypted=False).encrypted


def test_init_refuses_an_existing_repository_or_a_non_empty_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert main(["repo", "init", "nas", "--config", str(cfg)]) == 0
    before = (tmp_path / "repo" / "config").read_bytes()
    capsys.readouterr()
    assert main(["repo", "init", "nas", "--config", str(cfg)]) == 1
    assert "is already a repository; nothing done" in capsys.readouterr().err
    assert (tmp_path / "repo" / "config").read_bytes() == before

    other = tmp_path / "other"
    other.mkdir()
    cfg2 = other / "config"
    cfg2.mkdir()
    (other / "repo").mkdir()
    (other / "repo" / "precious.txt").write_text("do not touch")
    (cfg2 / "repo.yaml").write_text(
        (cfg / "repo.yaml").read_text().replace(str(tmp_path / "repo"), str(other / "repo"))
    )
    assert main(["repo", "init", "nas", "--config", str(cfg2)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (other / "repo").iterdir()) == ["precious.txt"]


def test_unknown_repository_and_missing_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert main(["repo", "init", "nsa", "--config", str(cfg)]) == 64
    assert "no Repository named 'nsa'; did you mean 'nas'?" in capsys.readouterr().err
    assert main(["repo", "--config", str(cfg)]) == 64
    assert "init, key, stats or gc" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_init_with_an_unreadable_secret_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    (tmp_path / "nas.key").chmod(0o644)  # refused: others may read it
    assert main(["repo", "init", "nas", "--config", str(cfg)]) == 78  # a secret of the config
    err = capsys.readouterr().err
    assert "esxi-reconciler repo init:" in err
    assert PASSPHRASE not in err
    assert not (tmp_path / "repo" / "config").exists()


def test_key_export_writes_a_private_key_file_that_restores_access(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert main(["repo", "init", "nas", "--config", str(cfg)]) == 0
    capsys.readouterr()
    out_file = tmp_path / "safe" / "nas-key.json"
    out_file.parent.mkdir()
    assert main(["repo", "key-export", "nas", "--out", str(out_file), "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert f"to {out_file} (mode 600)" in out
    assert "lost for good" in err and "passphrase" in err
    assert PASSPHRASE not in out + err
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    data = out_file.read_bytes()
    assert json.loads(data)["repository"] == Repository.open(tmp_path / "repo", PASSPHRASE).id

    # the export is what brings a repository back after its keys/ is lost
    for key in (tmp_path / "repo" / "keys").iterdir():
        key.unlink()
    with pytest.raises(WrongKeyError):
        Repository.open(tmp_path / "repo", PASSPHRASE)
    import_key(tmp_path / "repo", data, PASSPHRASE)
    assert Repository.open(tmp_path / "repo", PASSPHRASE).encrypted

    # never overwrites
    assert main(["repo", "key-export", "nas", "--out", str(out_file), "--config", str(cfg)]) == 1
    assert "exists; not overwritten" in capsys.readouterr().err
    assert out_file.read_bytes() == data


def test_key_export_checks_the_passphrase_and_needs_encryption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert main(["repo", "init", "nas", "--config", str(cfg)]) == 0
    (tmp_path / "nas.key").write_text("another passphrase\n")
    out_file = tmp_path / "k.json"
    assert main(["repo", "key-export", "nas", "--out", str(out_file), "--config", str(cfg)]) == 1
    assert "wrong passphrase" in capsys.readouterr().err
    assert not out_file.exists()

    plain = tmp_path / "plain"
    plain.mkdir()
    cfg2 = _config(plain, encrypted=False)
    assert main(["repo", "init", "nas", "--config", str(cfg2)]) == 0
    assert main(["repo", "key-export", "nas", "--out", str(out_file), "--config", str(cfg2)]) == 1
    assert "is not encrypted; it has no key" in capsys.readouterr().err
    assert not out_file.exists()
