"""The optional ``test_restore`` block of a VerifyPolicy: loaded into the model, absent by default, and
its host must be a configured Host."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reconciler.config import ConfigError, load_config
from reconciler.config.model import RestoreTest

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example"


def test_example_test_restore_block() -> None:
    desired = load_config(EXAMPLE)
    assert desired.verify_policies["nas-monthly-check"].test_restore == RestoreTest("esxi2", None, ("web01",))
    assert desired.verify_policies["offsite-after-copy"].test_restore is None


def test_unknown_host_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config"
    shutil.copytree(EXAMPLE, config)
    verify = config / "policies" / "verify.yaml"
    verify.write_text(verify.read_text().replace("host: esxi2", "host: esxi9"))
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert any("esxi9" in str(issue) and "test_restore" in str(issue) for issue in error.value.issues)
