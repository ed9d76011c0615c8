"""The loaded desired state: typed, immutable objects the rest of the code works with.

Everything here is a frozen dataclass built by :func:`reconciler.config.load_config` from validated
documents with every default filled in, so a reader never needs to know the defaults. Schedules and
retention are the engine's own types (:class:`reconciler.rules.schedule.Schedule`,
:class:`reconciler.rules.retention.RetentionPolicy`). Secrets are :class:`~reconciler.config.secrets.Secret`
references, resolved only when used.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import TypeVar

from reconciler.config.errors import ConfigIssue
from reconciler.config.secrets import Secret
from reconciler.facts.inventory import HostLimits, License
from reconciler.rules.retention import RetentionPolicy
from reconciler.rules.schedule import After, Schedule, Window


class CbtMode(str, enum.Enum):
    """Desired Changed Block Tracking state of a policy's VMs."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    UNMANAGED = "unmanaged"


class HookFailure(str, enum.Enum):
    """What a failing hook means for the run."""

    FAIL = "fail"
    IGNORE = "ignore"


@dataclass(frozen=True)
class Source:
    """Where an object was defined, for messages: file (relative to the config dir) and 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


# -- Host --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """API (and default SSH) login."""

    user: str
    password: Secret


@dataclass(frozen=True)
class ApiEndpoint:
    """The vSphere API over HTTPS. ``thumbprint`` is upper-case ``AA:BB:…`` (SHA-1 or SHA-256)."""

    port: int
    thumbprint: str | None
    insecure_skip_tls_verify: bool

    @property
    def thumbprint_algorithm(self) -> str | None:
        """``sha1`` or ``sha256`` by the pin's length; None when not pinned."""
        if self.thumbprint is None:
            return None
        return "sha1" if len(self.thumbprint) == 59 else "sha256"


@dataclass(frozen=True)
class SshEndpoint:
    """SSH access. ``user`` is already defaulted from the credentials."""

    enabled: bool
    port: int
    user: str
    host_key: str | None
    private_key: Secret | None
    insecure_skip_host_key_check: bool


@dataclass(frozen=True)
class Host:
    """A standalone ESXi host."""

    name: str
    address: str
    license: License
    credentials: Credentials
    api: ApiEndpoint
    ssh: SshEndpoint
    limits: HostLimits
    source: Source = field(compare=False)


# -- Repository --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalBackendConfig:
    """A repository in a local directory (a NAS volume)."""

    path: PurePosixPath
    type: str = "local"

    @property
    def location(self) -> str:
        """How messages and ``--json`` name the place: the path."""
        return str(self.path)


@dataclass(frozen=True)
class S3Credentials:
    """Access key of an S3-compatible service, by reference."""

    access_key_id: Secret
    secret_access_key: Secret
    session_token: Secret | None = None


@dataclass(frozen=True)
class S3BackendConfig:
    """A repository in a bucket (under a prefix) of S3-compatible object storage."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    """None: AWS S3 of ``region``."""
    region: str = "us-east-1"
    path_style: bool = False
    credentials: S3Credentials | None = None
    """None: the AWS default credential chain (environment, ~/.aws, instance role)."""
    ca_file: PurePosixPath | None = None
    """A PEM CA bundle trusted instead of the system's (a pinned private CA)."""
    insecure_skip_tls_verify: bool = False
    type: str = "s3"

    @property
    def url(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def location(self) -> str:
        """``s3://bucket/prefix at https://endpoint`` (or ``in region`` for AWS)."""
        return f"{self.url} at {self.endpoint}" if self.endpoint else f"{self.url} in {self.region}"


BackendConfig = LocalBackendConfig | S3BackendConfig
"""Union of all backend types."""


@dataclass(frozen=True)
class Compression:
    """Chunk compression; ``level`` is meaningful for zstd only."""

    algorithm: str
    level: int


@dataclass(frozen=True)
class Encryption:
    """Data encryption; ``key`` is set exactly when enabled."""

    enabled: bool
    key: Secret | None


@dataclass(frozen=True)
class PruneSettings:
    """Whether expired points are deleted, and the per-run guard."""

    enabled: bool
    max_deletions_per_run: int


@dataclass(frozen=True)
class RepositoryConfig:
    """Where restore points are stored."""

    name: str
    backend: BackendConfig
    compression: Compression
    encryption: Encryption
    prune: PruneSettings
    source: Source = field(compare=False)
    id: str | None = None
    """The pinned repository id (``spec.id``): opening refuses a path holding another repository."""


# -- BackupPolicy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmSelector:
    """Which VMs of the host a policy covers (names are case-sensitive display names)."""

    all: bool
    names: tuple[str, ...]
    patterns: tuple[str, ...]
    exclude: tuple[str, ...]

    def matches(self, vm_name: str) -> bool:
        """Whether the VM named ``vm_name`` is selected."""
        if any(fnmatch.fnmatchcase(vm_name, pattern) for pattern in self.exclude):
            return False
        return (
            self.all
            or vm_name in self.names
            or any(fnmatch.fnmatchcase(vm_name, pattern) for pattern in self.patterns)
        )

    def select(self, vm_names: Iterable[str]) -> tuple[str, ...]:
        """The selected names among ``vm_names``, in their order."""
        return tuple(name for name in vm_names if self.matches(name))


@dataclass(frozen=True)
class DiskSelector:
    """Which disks of each VM are backed up; globs match slot, label or file name."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def matches(self, *identifiers: str) -> bool:
        """Whether a disk known by these identifiers (e.g. ``"scsi0:1"``, ``"Hard disk 2"``,
        ``"web01_1.vmdk"``) is backed up."""

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(ident, p) for p in patterns for ident in identifiers)

        return hit(self.include) and not hit(self.exclude)


@dataclass(frozen=True)
class Hook:
    """A command run on the reconciler's machine around a VM's backup."""

    command: tuple[str, ...]
    timeout: timedelta
    on_failure: HookFailure


@dataclass(frozen=True)
class Hooks:
    """Pre and post hooks, run in order."""

    pre: tuple[Hook, ...]
    post: tuple[Hook, ...]


@dataclass(frozen=True)
class PowerCycle:
    """Permission to power-cycle running VMs on free hosts to switch CBT, and when."""

    allowed: bool
    window: Window | None
    shutdown_timeout: timedelta


@dataclass(frozen=True)
class BackupPolicy:
    """VMs of one host backed up to one repository on a schedule, with a retention.

    The policy's restore points form one retention group per VM: ``(policy name, host, VM)``.
    """

    name: str
    host: str
    repository: str
    vms: VmSelector
    disks: DiskSelector
    schedule: Schedule
    retention: RetentionPolicy
    cbt: CbtMode
    cbt_power_cycle: PowerCycle
    quiesce: bool
    snapshot_timeout: timedelta
    hooks: Hooks
    suspend: bool
    source: Source = field(compare=False)
    rpo: timedelta | None = None
    """The recovery-point objective given in ``spec.rpo`` (None: derived from the schedule, see
    :func:`reconciler.rules.schedule.default_rpo`)."""


@dataclass(frozen=True)
class RestoreTest:
    """The test restore of a verify policy: where the temporary VMs run, and which VMs."""

    host: str
    datastore: str | None = None
    vms: tuple[str, ...] = ()
    """Empty: every VM with points in the repository."""


@dataclass(frozen=True)
class VerifyPolicy:
    """A scheduled verification of a repository."""

    name: str
    repository: str
    schedule: Schedule
    read_data_percent: float
    suspend: bool
    source: Source = field(compare=False)
    test_restore: RestoreTest | None = None


@dataclass(frozen=True)
class CopyPolicy:
    """Restore points copied on a schedule from ``source`` to ``destination`` (an off-site copy); the
    destination keeps them by ``retention``, per (backup policy, VM) group."""

    name: str
    source: str
    destination: str
    schedule: Schedule
    retention: RetentionPolicy
    suspend: bool
    source_location: Source = field(compare=False)
    vms: tuple[str, ...] = ()
    """Globs of VM names; empty: every VM."""
    policies: tuple[str, ...] = ()
    """BackupPolicy names; empty: every policy."""
    max_age: timedelta | None = None


# -- Notifier ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """At most ``messages`` messages per ``per``."""

    messages: int
    per: timedelta


@dataclass(frozen=True)
class Notifier:
    """Where and what the daemon tells its owner. ``url`` is an apprise URL whose ``{name}`` placeholders
    are the ``secrets`` (references; filled in only when a message is sent)."""

    name: str
    url: str
    secrets: Mapping[str, Secret]
    events: frozenset[str]
    summary: Schedule | None
    rate_limit: RateLimit
    cbt_pending_after: timedelta
    repository_min_free_bytes: int
    repository_min_free_percent: float
    suspend: bool
    source: Source = field(compare=False)

    def wants(self, event: str) -> bool:
        return event in self.events

    def repository_has_room(self, capacity: int, free: int) -> bool:
        """Whether a repository volume keeps both free-space floors."""
        if free < self.repository_min_free_bytes:
            return False
        return capacity <= 0 or free * 100 >= capacity * self.repository_min_free_percent


@dataclass(frozen=True)
class Listen:
    """The daemon's HTTP(S) listener: metrics, health, status page, git webhook."""

    address: str
    port: int
    token: Secret | None
    tls_cert: PurePosixPath | None = None
    tls_key: PurePosixPath | None = None


@dataclass(frozen=True)
class Monitoring:
    """How the daemon is watched: its listener (None: none) and the node_exporter text file (None:
    none); ``ready_after``: how old the last cycle may be for /readyz."""

    name: str
    listen: Listen | None
    textfile: PurePosixPath | None
    ready_after: timedelta
    source: Source = field(compare=False)


# -- revision and the whole --------------------------------------------------------------------------


@dataclass(frozen=True)
class Revision:
    """Which version of the config this is: a digest of the loaded files, plus the git commit if any.

    ``id`` is what plans, actions and restore points record: ``git:<commit>``, ``git:<commit>+dirty``
    when the work tree has uncommitted changes, or ``sha256:<digest>`` outside git.
    """

    digest: str
    """sha256 (hex) over the names and contents of the loaded files."""
    commit: str | None = None
    dirty: bool = False

    @property
    def id(self) -> str:
        """The short identifier, e.g. ``git:3f2a…+dirty``."""
        if self.commit is None:
            return f"sha256:{self.digest}"
        return f"git:{self.commit}{'+dirty' if self.dirty else ''}"

    def __str__(self) -> str:
        return self.id


_T = TypeVar("_T")


def _index(items: Iterable[_T], name: str) -> Mapping[str, _T]:
    return MappingProxyType({getattr(item, name): item for item in items})


def _sorted_by_name(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(sorted(items, key=lambda item: str(getattr(item, "name"))))  # noqa: B009


@dataclass(frozen=True, eq=False)
class DesiredState:
    """Everything the config declares, cross-checked, with lookups.

    The mappings are read-only and ordered by name. ``warnings`` are problems that do not stop the
    config from being used (e.g. an insecure opt-out), with their locations.
    """

    hosts: Mapping[str, Host]
    repositories: Mapping[str, RepositoryConfig]
    policies: Mapping[str, BackupPolicy]
    verify_policies: Mapping[str, VerifyPolicy]
    revision: Revision
    warnings: tuple[ConfigIssue, ...] = ()
    copy_policies: Mapping[str, CopyPolicy] = field(default_factory=lambda: MappingProxyType({}))
    notifiers: Mapping[str, Notifier] = field(default_factory=lambda: MappingProxyType({}))
    monitoring: Monitoring | None = None
    """The Monitoring document, if the config has one."""

    @classmethod
    def build(  # noqa: PLR0913  one iterable per kind of the config; the later ones keyword-only in use
        cls,
        hosts: Iterable[Host],
        repositories: Iterable[RepositoryConfig],
        policies: Iterable[BackupPolicy],
        verify_policies: Iterable[VerifyPolicy],
        revision: Revision,
        warnings: Iterable[ConfigIssue] = (),
        copy_policies: Iterable[CopyPolicy] = (),
        notifiers: Iterable[Notifier] = (),
        monitoring: Monitoring | None = None,
    ) -> DesiredState:
        """Assemble from unordered objects (names must already be unique per kind)."""
        return cls(
            hosts=_index(_sorted_by_name(hosts), "name"),
            repositories=_index(_sorted_by_name(repositories), "name"),
            policies=_index(_sorted_by_name(policies), "name"),
            verify_policies=_index(_sorted_by_name(verify_policies), "name"),
            revision=revision,
            warnings=tuple(sorted(warnings)),
            copy_policies=_index(_sorted_by_name(copy_policies), "name"),
            notifiers=_index(_sorted_by_name(notifiers), "name"),
            monitoring=monitoring,
        )

    def host(self, name: str) -> Host:
        """The Host named ``name`` (KeyError if none)."""
        return self.hosts[name]

    def repository(self, name: str) -> RepositoryConfig:
        """The Repository named ``name`` (KeyError if none)."""
        return self.repositories[name]

    def policy(self, name: str) -> BackupPolicy:
        """The BackupPolicy named ``name`` (KeyError if none)."""
        return self.policies[name]

    def verify_policy(self, name: str) -> VerifyPolicy:
        """The VerifyPolicy named ``name`` (KeyError if none)."""
        return self.verify_policies[name]

    def policies_for_host(self, host: str) -> tuple[BackupPolicy, ...]:
        """Backup policies of a host, by name."""
        return tuple(p for p in self.policies.values() if p.host == host)

    def policies_for_repository(self, repository: str) -> tuple[BackupPolicy, ...]:
        """Backup policies writing to a repository, by name."""
        return tuple(p for p in self.policies.values() if p.repository == repository)

    def policies_for_vm(self, host: str, vm_name: str) -> tuple[BackupPolicy, ...]:
        """Every policy protecting VM ``vm_name`` of ``host`` (possibly several), by name."""
        return tuple(p for p in self.policies.values() if p.host == host and p.vms.matches(vm_name))

    def dependents(self, policy: str) -> tuple[BackupPolicy, ...]:
        """Backup policies scheduled to run after ``policy`` has succeeded."""
        return tuple(p for p in self.policies.values() if after_policy(p.schedule) == policy)


def after_policy(schedule: Schedule) -> str | None:
    """The policy a schedule chains after (``after`` form), or None."""
    return schedule.spec.policy if isinstance(schedule.spec, After) else None
