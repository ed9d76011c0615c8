"""The desired state: YAML documents under a config directory, validated and loaded into frozen objects.

How the rest of the code loads the config::

    from reconciler.config import ConfigError, load_config

    try:
        desired = load_config(path)          # path: directory tree or one file; default default_config_dir()
    except ConfigError as error:
        for issue in error.issues:           # every problem, sorted, e.g.
            print(issue)                     # hosts/esxi1.yaml:12:5 spec.ssh.port: 70000 is greater than …
    desired.host("esxi1"); desired.policies_for_vm("esxi1", "web01"); desired.revision.id

Layout: :mod:`.documents` (safe YAML with positions), :mod:`.schemas` (the JSON Schemas),
:mod:`.validation` (schema checks with located, worded errors; defaults), :mod:`.model` (the frozen types),
:mod:`.loader` (building and cross-checking), :mod:`.secrets` (secret references), :mod:`.revision` (git
commit or digest), :mod:`.docgen` (``docs/config.md``).

The loader and the revision (YAML, JSON Schema, git) are imported on first use of their names, so the
frozen model and its readers (the planner, the status conditions) do not load them.
"""

import importlib
from typing import TYPE_CHECKING, Any

from reconciler.config.errors import ConfigError, ConfigIssue
from reconciler.config.model import (
    ApiEndpoint,
    BackupPolicy,
    CbtMode,
    Compression,
    CopyPolicy,
    Credentials,
    DesiredState,
    DiskSelector,
    Encryption,
    Hook,
    HookFailure,
    Hooks,
    Host,
    LocalBackendConfig,
    PowerCycle,
    PruneSettings,
    RepositoryConfig,
    Revision,
    Source,
    SshEndpoint,
    VerifyPolicy,
    VmSelector,
)
from reconciler.config.secrets import Secret, SecretError

if TYPE_CHECKING:
    from reconciler.config.loader import default_config_dir, load_config, parse_interval, parse_size
    from reconciler.config.revision import config_revision

_ON_FIRST_USE = {
    "default_config_dir": "reconciler.config.loader",
    "load_config": "reconciler.config.loader",
    "parse_interval": "reconciler.config.loader",
    "parse_size": "reconciler.config.loader",
    "config_revision": "reconciler.config.revision",
}


def __getattr__(name: str) -> Any:
    """``load_config`` and the other names of the loader and the revision, imported on first use."""
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ApiEndpoint",
    "BackupPolicy",
    "CbtMode",
    "Compression",
    "ConfigError",
    "ConfigIssue",
    "CopyPolicy",
    "Credentials",
    "DesiredState",
    "DiskSelector",
    "Encryption",
    "Hook",
    "HookFailure",
    "Hooks",
    "Host",
    "LocalBackendConfig",
    "PowerCycle",
    "PruneSettings",
    "RepositoryConfig",
    "Revision",
    "Secret",
    "SecretError",
    "Source",
    "SshEndpoint",
    "VerifyPolicy",
    "VmSelector",
    "config_revision",
    "default_config_dir",
    "load_config",
    "parse_interval",
    "parse_size",
]
