"""The secret scan itself: it finds a registered secret however the product would have leaked it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.reliability.secretscan import SecretScan, private_files

KEY = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACBn7oKpQJ0ubzmFEBPXlBAkp+Hd0ILtGxc4L5Rz0lT7HQAAAJhB0CzkQdAs
-----END OPENSSH PRIVATE KEY-----
"""


def test_found_in_output_in_any_form_and_in_files(tmp_path: Path) -> None:
    scan = SecretScan()
    scan.secret('pa"ss\\word 1', "password")
    scan.secret(KEY, "ssh key")
    scan.secret("short", "too short to look for")
    assert scan.output("nothing here; short", "out") == []
    assert [f.what for f in scan.output('login with pa"ss\\word 1 failed', "stderr")] == ["password"]
    as_json = json.dumps({"error": 'pa"ss\\word 1'})  # a JSON log line escapes it
    assert [f.what for f in scan.output(as_json, "log")] == ["password"]
    one_line = KEY.splitlines()[2]  # a key reformatted, one line of it quoted in an error
    assert [f.what for f in scan.output(f"cannot load key ({one_line})", "err")] == ["ssh key"]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.db").write_bytes(b"\x00\x01" + b'pa"ss\\word 1' + b"\x00")
    (tmp_path / "state" / "clean").write_text("nothing")
    scan.directory(tmp_path / "state", "state")
    assert [(f.what, f.where) for f in scan.scan_directories()] == [
        ("password", f"state: {tmp_path / 'state' / 'status.db'}")
    ]
    assert len(scan.findings) == 4


def test_loose_modes_are_reported(tmp_path: Path) -> None:
    private, loose = tmp_path / "a", tmp_path / "b"
    private.write_text("x")
    loose.write_text("x")
    private.chmod(0o600)
    loose.chmod(0o640)
    assert private_files([private, loose]) == [f"{loose} (mode 0640)"]


def test_a_configs_notifier_secrets_are_watched_as_given_and_url_encoded(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    token = tmp_path / "token"
    token.write_text("tok/en+with&odd?chars")
    token.chmod(0o600)
    (config / "n.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: Notifier\nmetadata: {name: phone}\n"
        f"spec: {{url: 'gotify://gotify.example.org/{{token}}', secrets: {{token: {{file: {token}}}}}}}\n"
    )
    scan = SecretScan()
    scan.watch_config(config)
    assert [f.what for f in scan.output("sent with tok/en+with&odd?chars", "log")] == [
        "secret {token} of notifier phone"
    ]
    leaked_url = "gotify://gotify.example.org/tok%2Fen%2Bwith%26odd%3Fchars failed"
    assert [f.what for f in scan.output(leaked_url, "log")] == [
        "secret {token} of notifier phone (URL-encoded)"
    ]
