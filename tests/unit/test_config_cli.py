"""``esxi-reconciler validate``: exit codes and output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reconciler.cli import main

REPO = Path(__file__).resolve().parents[2]


def line_of(path: Path, text: str) -> int:
    """1-based number of the first line of ``path`` containing ``text`` (the example may be re-commented)."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    directory = tmp_path / "config"
    shutil.copytree(REPO / "config.example", directory)
    return directory


def test_valid_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(
        "OK: 2 hosts, 3 repositories, 3 policies, 2 verify policies, 1 copy policy, 2 notifiers (revision"
        " sha256:"
    )
    assert err == ""


def test_config_option_and_environment(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["validate", "--config", str(config)]) == 0
    monkeypatch.setenv("ESXI_RECONCILER_CONFIG", str(config))
    assert main(["validate"]) == 0
    assert capsys.readouterr().out.count("OK: ") == 2
    assert main(["validate", str(config), "--config", str(config / "hosts")]) == 64
    assert "either as DIR or --config" in capsys.readouterr().err


def test_default_directory(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESXI_RECONCILER_CONFIG", raising=False)
    if Path("/etc/esxi-reconciler/config.d").exists():
        pytest.skip("a real config is installed here")
    assert main(["validate"]) == 78
    assert capsys.readouterr().out == (
        "/etc/esxi-reconciler/config.d config directory does not exist\n"
        "FAILED: 1 error in 1 file (/etc/esxi-reconciler/config.d)\n"
    )


def test_invalid_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = config / "hosts" / "esxi1.yaml"
    host.write_text(
        host.read_text().replace("port: 22", "port: 70000").replace("license: free", "license: yes")
    )
    (config / "policies" / "apps.yaml").write_text(
        (config / "policies" / "apps.yaml").read_text().replace("cbt: enabled", "cbt: on")
    )
    assert main(["validate", str(config)]) == 78
    out, _ = capsys.readouterr()
    license_line, port_line = line_of(host, "license:"), line_of(host, "port: 70000")
    cbt_line = line_of(config / "policies" / "apps.yaml", "cbt:")
    assert out.splitlines() == [
        f"hosts/esxi1.yaml:{license_line}:3 spec.license: 'yes' is not one of 'auto', 'free', 'licensed'",
        f"hosts/esxi1.yaml:{port_line}:5 spec.ssh.port: 70000 is greater than the maximum of 65535",
        f"policies/apps.yaml:{cbt_line}:3 spec.cbt: 'on' is not one of 'enabled', 'disabled', 'unmanaged';"
        " did you mean 'enabled'?",
        f"FAILED: 3 errors in 2 files ({config})",
    ]


def test_json_output(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--format", "json", str(config)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is True and result["errors"] == [] and result["warnings"] == []
    assert result["counts"] == {
        "hosts": 2,
        "repositories": 3,
        "policies": 3,
        "verify_policies": 2,
        "copy_policies": 1,
        "notifiers": 2,
    }
    assert result["revision"]["id"].startswith("sha256:")

    (config / "hosts" / "broken.yaml").write_text("a: 1\na: 2\n")
    assert main(["validate", "--format", "json", str(config)]) == 78
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is False
    assert result["errors"] == [
        {
            "file": "hosts/broken.yaml",
            "line": 2,
            "column": 1,
            "path": "",
            "message": "duplicate key 'a' (first defined at line 1); YAML would silently keep only the last"
            " one",
        }
    ]


def test_warnings_go_to_stderr(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = config / "hosts" / "esxi2.yaml"
    text = host.read_text()
    start = text.index('    thumbprint: "')
    end = text.index("\n", start)
    host.write_text(text[:start] + "    insecure_skip_tls_verify: true" + text[end:])
    assert main(["validate", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: ")
    line = line_of(host, "insecure_skip_tls_verify")
    assert err == (
        f"warning: hosts/esxi2.yaml:{line}:5 spec.api.insecure_skip_tls_verify: INSECURE: TLS certificate"
        " of host 'esxi2' is not verified\n"
    )


def test_resolve_secrets(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["validate", "--resolve-secrets", str(config)]) == 78
    out, _ = capsys.readouterr()
    line = line_of(config / "hosts" / "esxi1.yaml", "password: {")
    assert f"hosts/esxi1.yaml:{line}:5 spec.credentials.password: Secret(credential:esxi1-password):" in out
    assert out.splitlines()[-1] == f"FAILED: 9 errors in 6 files ({config})"


def test_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["validate", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "esxi-reconciler validate config.example/" in out
    assert "exit codes: 0 success; 1 the operation failed" in out and "78 configuration" in out
