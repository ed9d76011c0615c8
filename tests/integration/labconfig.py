"""A desired-state config pointed at the running lab, for integration tests.

:func:`write_lab_config` writes both lab hosts (pinned API and SSH), one encrypted repository ``r``
under ``root/repo`` and the policy documents the test passes; :func:`policy_yaml` builds one policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from esxisim.handle import LabHandle

PASSPHRASE = "correct horse battery staple"


def private_file(path: Path, text: str) -> str:
    """Write a secret file with mode 600 (the loader refuses group/world-readable secrets)."""
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def policy_yaml(
    name: str,
    host: str,
    vms: list[str],
    *,
    repository: str = "r",
    schedule: str = '{daily: {at: "02:00"}}',
    retention: str = "{keep_last: 3}",
    extra: str = "",
) -> str:
    """One BackupPolicy document (``extra``: more ``spec`` lines, each indented by two spaces)."""
    return f"""---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: {json.dumps(name, ensure_ascii=False)}}}
spec:
  host: {host}
  repository: {repository}
  vms: {{names: {json.dumps(vms, ensure_ascii=False)}}}
  schedule: {schedule}
  retention: {retention}
{extra}"""


def write_lab_config(
    lab: LabHandle,
    root: Path,
    policies: str,
    *,
    repository_extra: str = "",
    hosts: Sequence[str] | None = None,
    limits: str = "{concurrent_backups: 2, concurrent_backups_per_datastore: 2}",
) -> Path:
    """Write ``root/config`` (hosts, repository ``r`` at ``root/repo``, ``policies/p.yaml`` =
    ``policies``) with secrets in ``root/secrets``; returns the config directory. ``repository_extra``:
    more ``spec`` lines of the repository (e.g. ``"  prune: {enabled: true}\\n"``); ``hosts``: which
    hosts of the lab (default the free and the licensed one), each with ``limits``."""
    cfg = root / "config"
    for sub in ("hosts", "repositories", "policies"):
        (cfg / sub).mkdir(parents=True)
    secrets = root / "secrets"
    secrets.mkdir(mode=0o700)
    for name in hosts or (lab.free, lab.licensed):
        info = lab.host(name)
        pw = private_file(secrets / f"{name}.pw", lab.password(name))
        (cfg / "hosts" / f"{name}.yaml").write_text(
            f"""apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: {name}}}
spec:
  address: {info["api"]["host"]}
  credentials: {{user: root, password: {{file: {pw}}}}}
  api: {{port: {info["api"]["port"]}, thumbprint: "{info["api"]["thumbprint_sha256"]}"}}
  ssh: {{port: {info["ssh"]["port"]}, host_key: "{info["ssh"]["host_key_fingerprint"]}"}}
  limits: {limits}
"""
        )
    key = private_file(secrets / "repo.key", PASSPHRASE)
    (cfg / "repositories" / "r.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: r}}
spec:
  backend: {{type: local, path: {root / "repo"}}}
  encryption: {{enabled: true, key: {{file: {key}}}}}
{repository_extra}"""
    )
    (cfg / "policies" / "p.yaml").write_text(policies)
    return cfg
