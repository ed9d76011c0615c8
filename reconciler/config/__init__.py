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
"""

from reconciler.config.errors import ConfigError, ConfigIssue
from reconciler.config.loader import default_config_dir, load_config, parse_interval, parse_size
from reconciler.config.model import (
    ApiEndpoint,
    BackupPolicy,
    CbtMode,
    Compression,
    Credentials,
    DesiredState,
    DiskSelector,
    Encryption,
    Hook,
    HookFailure,
    Hooks,
    Host,
    LocalBackend,
    PowerCycle,
    PruneSettings,
    Repository,
    Revision,
    Source,
    SshEndpoint,
    VerifyPolicy,
    VmSelector,
)
from reconciler.config.revision import config_revision
from reconciler.config.secrets import Secret, SecretError

__all__ = [
    "ApiEndpoint",
    "BackupPolicy",
    "CbtMode",
    "Compression",
    "ConfigError",
    "ConfigIssue",
    "Credentials",
    "DesiredState",
    "DiskSelector",
    "Encryption",
    "Hook",
    "HookFailure",
    "Hooks",
    "Host",
    "LocalBackend",
    "PowerCycle",
    "PruneSettings",
    "Repository",
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
