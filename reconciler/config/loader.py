"""Loading the config directory into a :class:`~reconciler.config.model.DesiredState`.

Order of work, each step reporting every problem it finds before the next runs:

1. find ``*.yaml``/``*.yml`` files (no dotfiles) and read them safely (:mod:`.documents`);
2. check each document against its kind's JSON Schema (:mod:`.validation`);
3. fill in schema defaults and build the frozen model, with the engine's ``Schedule`` and
   ``RetentionPolicy``; their parse errors (bad cron, bad duration, unknown time zone) become located
   issues;
4. cross-check: unique names per kind, references between objects, chains, overlapping repositories;
5. optionally (``resolve_secrets``) try to read every secret reference.

Any error raises :class:`~reconciler.config.errors.ConfigError` with all issues, sorted. Warnings (loud
insecure opt-outs and the like) travel in ``DesiredState.warnings``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from reconciler.config import model, schemas
from reconciler.config.documents import (
    Document,
    PathElement,
    display_name,
    find_files,
    format_path,
    read_file,
)
from reconciler.config.errors import ConfigError, ConfigIssue
from reconciler.config.revision import config_revision
from reconciler.config.secrets import Secret, SecretError
from reconciler.config.validation import apply_defaults, suggest, validate_document
from reconciler.facts.inventory import HostLimits, License
from reconciler.rules import retention, schedule

DEFAULT_CONFIG_DIR = Path("/etc/esxi-reconciler/config.d")
CONFIG_ENV = "ESXI_RECONCILER_CONFIG"

WEEKDAY_NUMBERS = {name: number for number, name in enumerate(schemas.WEEKDAYS)}
"""``mon`` → 0 … ``sun`` → 6, the engine's numbering."""

_DURATION_PART = re.compile(r"([0-9]+)([smhdw])")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

T = TypeVar("T")


def default_config_dir() -> Path:
    """``$ESXI_RECONCILER_CONFIG`` if set, else ``/etc/esxi-reconciler/config.d``."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_DIR)


def parse_interval(text: str) -> timedelta:
    """``"1h30m"`` → ``timedelta(hours=1, minutes=30)``; units s, m (minutes), h, d, w."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration such as 30m, 6h or 1h30m")
    total = timedelta()
    for number, unit in parts:
        total += timedelta(**{_DURATION_UNITS[unit]: int(number)})
    return total


def parse_size(value: int | str) -> int:
    """``"20GiB"`` → bytes; an int is already bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(value)
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size such as 20GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _time(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


# -- building, with issues collected ----------------------------------------------------------------


@dataclass
class _Build:
    """Issues, warnings and secret references gathered while building one config."""

    issues: list[ConfigIssue] = field(default_factory=list)
    warnings: list[ConfigIssue] = field(default_factory=list)
    secrets: list[tuple[Secret, Document, tuple[PathElement, ...]]] = field(default_factory=list)

    def attempt(self, doc: Document, path: Sequence[PathElement], make: Callable[[], T]) -> T | None:
        """``make()``, turning a ValueError (ScheduleError, RetentionError …) into an issue at ``path``."""
        try:
            return make()
        except ValueError as error:
            self.issues.append(doc.issue(path, str(error)))
            return None

    def secret(self, doc: Document, path: tuple[PathElement, ...], reference: dict[str, str]) -> Secret:
        secret = Secret.from_reference(reference)
        self.secrets.append((secret, doc, path))
        return secret


def _source(doc: Document) -> model.Source:
    return model.Source(doc.file, doc.node.start_mark.line + 1)


def _build_zone(build: _Build, doc: Document, path: tuple[PathElement, ...], name: str) -> str | None:
    """``name`` if the engine accepts the time zone, else None (and an issue at ``path``)."""

    def check() -> str:
        schedule.Schedule(schedule.Manual(), name)  # the engine's own zone check and message
        return name

    return build.attempt(doc, path, check)


def _build_window(
    build: _Build, doc: Document, path: tuple[PathElement, ...], raw: dict[str, Any]
) -> schedule.Window | None:
    days = frozenset(WEEKDAY_NUMBERS[d] for d in raw["days"]) if "days" in raw else None
    return build.attempt(doc, path, lambda: schedule.Window(_time(raw["start"]), _time(raw["end"]), days))


def _build_spec(
    build: _Build, doc: Document, path: tuple[PathElement, ...], raw: dict[str, Any], zone: str
) -> schedule.ScheduleSpec | None:
    form = next(name for name in schemas.SCHEDULE_FORMS if name in raw)
    value = raw[form]
    at = (*path, form)

    def make() -> schedule.ScheduleSpec:
        if form == "once":
            instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if instant.tzinfo is None:
                instant = instant.replace(tzinfo=ZoneInfo(zone))
            return schedule.Once(instant)
        if form == "every":
            return schedule.Every(parse_interval(value))
        if form == "daily":
            return schedule.Daily(_time(value["at"]))
        if form == "weekly":
            return schedule.Weekly(frozenset(WEEKDAY_NUMBERS[d] for d in value["days"]), _time(value["at"]))
        if form == "monthly":
            return schedule.Monthly(value["day"], _time(value["at"]))
        if form == "cron":
            return schedule.Cron(value)
        if form == "after":
            return schedule.After(value)
        return schedule.Manual()

    return build.attempt(doc, at, make)


def _build_schedule(
    build: _Build, doc: Document, path: tuple[PathElement, ...], raw: dict[str, Any]
) -> schedule.Schedule | None:
    zone = _build_zone(build, doc, (*path, "timezone"), raw["timezone"])
    # Go on with UTC after a bad zone, so a bad cron expression in the same schedule is reported too.
    spec = _build_spec(build, doc, path, raw, zone or "UTC")
    window = _build_window(build, doc, (*path, "window"), raw["window"]) if "window" in raw else None
    jitter = parse_interval(raw["jitter"])
    if zone is None or spec is None or ("window" in raw and window is None):
        return None
    return build.attempt(doc, path, lambda: schedule.Schedule(spec, zone, window, jitter))


def _build_retention(
    build: _Build, doc: Document, path: tuple[PathElement, ...], raw: dict[str, Any], default_zone: str
) -> retention.RetentionPolicy | None:
    within = None
    if "keep_within" in raw:
        within = build.attempt(
            doc, (*path, "keep_within"), lambda: retention.parse_duration(raw["keep_within"])
        )
        if within is None:
            return None
    zone = default_zone
    if "timezone" in raw:
        zone_or_none = _build_zone(build, doc, (*path, "timezone"), raw["timezone"])
        if zone_or_none is None:
            return None
        zone = zone_or_none
    counts = {rule: raw.get(rule) for rule in schemas.RETENTION_RULES if rule != "keep_within"}
    return build.attempt(
        doc, path, lambda: retention.RetentionPolicy(**counts, keep_within=within, timezone=zone)
    )


def _check_insecure_opt_out(
    build: _Build, doc: Document, path: tuple[str, ...], pinned: bool, pin_field: str, what: str
) -> None:
    """An explicit opt-out of pinning is an error next to a pin, and a loud warning otherwise."""
    if pinned:
        build.issues.append(doc.issue(path, f"contradicts the pinned {pin_field}; remove one of them"))
    else:
        build.warnings.append(doc.issue(path, f"INSECURE: {what} is not verified"))


def _build_host(build: _Build, doc: Document, spec: dict[str, Any]) -> model.Host:
    name = doc.data["metadata"]["name"]
    api, ssh, limits, creds = spec["api"], spec["ssh"], spec["limits"], spec["credentials"]
    if api["insecure_skip_tls_verify"]:
        _check_insecure_opt_out(
            build,
            doc,
            ("spec", "api", "insecure_skip_tls_verify"),
            "thumbprint" in api,
            "thumbprint",
            f"TLS certificate of host {name!r}",
        )
    if ssh["enabled"] and ssh["insecure_skip_host_key_check"]:
        _check_insecure_opt_out(
            build,
            doc,
            ("spec", "ssh", "insecure_skip_host_key_check"),
            "host_key" in ssh,
            "host_key",
            f"SSH host key of host {name!r}",
        )
    if spec["license"] == "free" and not ssh["enabled"]:
        build.issues.append(
            doc.issue(
                ("spec", "ssh", "enabled"),
                "a free-licensed host is driven over SSH (its API is read-only); enable ssh",
            )
        )
    private_key = None
    if "private_key" in ssh:
        private_key = build.secret(doc, ("spec", "ssh", "private_key"), ssh["private_key"])
    free = limits["min_datastore_free"]
    return model.Host(
        name=name,
        address=spec["address"],
        license=License(spec["license"]),
        credentials=model.Credentials(
            user=creds["user"],
            password=build.secret(doc, ("spec", "credentials", "password"), creds["password"]),
        ),
        api=model.ApiEndpoint(
            port=api["port"],
            thumbprint=api["thumbprint"].upper() if "thumbprint" in api else None,
            insecure_skip_tls_verify=api["insecure_skip_tls_verify"],
        ),
        ssh=model.SshEndpoint(
            enabled=ssh["enabled"],
            port=ssh["port"],
            user=ssh.get("user", creds["user"]),
            host_key=ssh.get("host_key"),
            private_key=private_key,
            insecure_skip_host_key_check=ssh["insecure_skip_host_key_check"],
        ),
        limits=HostLimits(
            concurrent_backups=limits["concurrent_backups"],
            concurrent_backups_per_datastore=limits["concurrent_backups_per_datastore"],
            min_datastore_free_bytes=parse_size(free["size"]),
            min_datastore_free_percent=float(free["percent"]),
        ),
        source=_source(doc),
    )


def _build_repository(build: _Build, doc: Document, spec: dict[str, Any]) -> model.RepositoryConfig:
    encryption = spec["encryption"]
    key = None
    if encryption["enabled"]:
        key = build.secret(doc, ("spec", "encryption", "key"), encryption["key"])
    elif "key" in encryption:
        build.warnings.append(doc.issue(("spec", "encryption", "key"), "ignored: encryption is disabled"))
    return model.RepositoryConfig(
        name=doc.data["metadata"]["name"],
        backend=_build_backend(build, doc, spec["backend"]),
        compression=model.Compression(spec["compression"]["algorithm"], spec["compression"]["level"]),
        encryption=model.Encryption(enabled=encryption["enabled"], key=key),
        prune=model.PruneSettings(spec["prune"]["enabled"], spec["prune"]["max_deletions_per_run"]),
        source=_source(doc),
        id=spec.get("id"),
    )


_S3_FIELDS = ("endpoint", "bucket", "prefix", "region", "path_style", "credentials", "tls")
_S3_DEFAULTS: dict[str, Any] = {
    "prefix": "",
    "region": "us-east-1",
    "path_style": False,
    "tls": {"insecure_skip_verify": False},
}
"""What defaults fill in for every backend: present on a local backend without meaning anything."""


def _build_backend(build: _Build, doc: Document, raw: dict[str, Any]) -> model.BackendConfig:
    if raw["type"] == "local":
        for name in _S3_FIELDS:
            if name in raw and raw[name] != _S3_DEFAULTS.get(name):
                build.issues.append(
                    doc.issue(("spec", "backend", name), "only for type s3; a local backend has a path only")
                )
        return model.LocalBackendConfig(path=PurePosixPath(os.path.normpath(raw["path"])))
    where = ("spec", "backend")
    if "path" in raw:
        build.issues.append(
            doc.issue((*where, "path"), "only for type local; an s3 backend has bucket and prefix instead")
        )
    credentials = None
    if "credentials" in raw:
        creds = raw["credentials"]
        credentials = model.S3Credentials(
            build.secret(doc, (*where, "credentials", "access_key_id"), creds["access_key_id"]),
            build.secret(doc, (*where, "credentials", "secret_access_key"), creds["secret_access_key"]),
            build.secret(doc, (*where, "credentials", "session_token"), creds["session_token"])
            if "session_token" in creds
            else None,
        )
    tls = raw["tls"]
    insecure = bool(tls["insecure_skip_verify"])
    if insecure:
        _check_insecure_opt_out(
            build,
            doc,
            (*where, "tls", "insecure_skip_verify"),
            "ca_file" in tls,
            "tls.ca_file",
            "the object store's certificate",
        )
    endpoint = raw.get("endpoint")
    if endpoint is not None and endpoint.startswith("http://"):
        build.warnings.append(
            doc.issue(
                (*where, "endpoint"),
                "INSECURE: plain HTTP: credentials and (unless encryption is enabled) data travel in clear",
            )
        )
    return model.S3BackendConfig(
        bucket=raw["bucket"],
        prefix=raw["prefix"].strip("/"),
        endpoint=endpoint.rstrip("/") if endpoint else None,
        region=raw["region"],
        path_style=raw["path_style"],
        credentials=credentials,
        ca_file=PurePosixPath(tls["ca_file"]) if "ca_file" in tls else None,
        insecure_skip_tls_verify=insecure,
    )


def _hooks(raw: list[dict[str, Any]]) -> tuple[model.Hook, ...]:
    return tuple(
        model.Hook(
            tuple(hook["command"]), parse_interval(hook["timeout"]), model.HookFailure(hook["on_failure"])
        )
        for hook in raw
    )


def _build_backup_policy(build: _Build, doc: Document, spec: dict[str, Any]) -> model.BackupPolicy | None:
    vms = spec["vms"]
    if vms["all"] and ("names" in vms or "patterns" in vms):
        build.issues.append(
            doc.issue(
                ("spec", "vms", "all"),
                "all: true already selects every VM; remove names and patterns, or all",
            )
        )
    sched = _build_schedule(build, doc, ("spec", "schedule"), spec["schedule"])
    zone = sched.timezone if sched is not None else "UTC"
    keep = _build_retention(build, doc, ("spec", "retention"), spec["retention"], zone)
    cycle = spec["cbt_power_cycle"]
    window = None
    if "window" in cycle:
        window = _build_window(build, doc, ("spec", "cbt_power_cycle", "window"), cycle["window"])
    if cycle["allowed"] and spec["cbt"] == "unmanaged":
        build.warnings.append(
            doc.issue(("spec", "cbt_power_cycle", "allowed"), "has no effect: cbt is unmanaged")
        )
    if sched is None or keep is None:
        return None
    return model.BackupPolicy(
        name=doc.data["metadata"]["name"],
        host=spec["host"],
        repository=spec["repository"],
        vms=model.VmSelector(
            vms["all"], tuple(vms.get("names", ())), tuple(vms.get("patterns", ())), tuple(vms["exclude"])
        ),
        disks=model.DiskSelector(tuple(spec["disks"]["include"]), tuple(spec["disks"]["exclude"])),
        schedule=sched,
        retention=keep,
        cbt=model.CbtMode(spec["cbt"]),
        cbt_power_cycle=model.PowerCycle(cycle["allowed"], window, parse_interval(cycle["shutdown_timeout"])),
        quiesce=spec["quiesce"],
        snapshot_timeout=parse_interval(spec["snapshot_timeout"]),
        hooks=model.Hooks(_hooks(spec["hooks"]["pre"]), _hooks(spec["hooks"]["post"])),
        suspend=spec["suspend"],
        source=_source(doc),
        rpo=parse_interval(spec["rpo"]) if "rpo" in spec else None,
    )


def _build_verify_policy(build: _Build, doc: Document, spec: dict[str, Any]) -> model.VerifyPolicy | None:
    sched = _build_schedule(build, doc, ("spec", "schedule"), spec["schedule"])
    if sched is None:
        return None
    return model.VerifyPolicy(
        name=doc.data["metadata"]["name"],
        repository=spec["repository"],
        schedule=sched,
        read_data_percent=float(spec["read_data_percent"]),
        suspend=spec["suspend"],
        source=_source(doc),
        test_restore=_restore_test(spec.get("test_restore")),
    )


def _restore_test(spec: dict[str, Any] | None) -> model.RestoreTest | None:
    if spec is None:
        return None
    return model.RestoreTest(spec["host"], spec.get("datastore"), tuple(spec.get("vms", ())))


def _build_copy_policy(build: _Build, doc: Document, spec: dict[str, Any]) -> model.CopyPolicy | None:
    sched = _build_schedule(build, doc, ("spec", "schedule"), spec["schedule"])
    if sched is None:
        return None
    keep = _build_retention(build, doc, ("spec", "retention"), spec["retention"], sched.timezone)
    if keep is None:
        return None
    if spec["source"] == spec["destination"]:
        build.issues.append(
            doc.issue(("spec", "destination"), "is the source repository; copy to another Repository")
        )
    return model.CopyPolicy(
        name=doc.data["metadata"]["name"],
        source=spec["source"],
        destination=spec["destination"],
        schedule=sched,
        retention=keep,
        suspend=spec["suspend"],
        source_location=_source(doc),
        vms=tuple(spec.get("vms", ())),
        policies=tuple(spec.get("policies", ())),
        max_age=parse_interval(spec["max_age"]) if "max_age" in spec else None,
    )


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@?#\s]*:([^/@?#\s]+)@")


def _build_notifier(build: _Build, doc: Document, spec: dict[str, Any]) -> model.Notifier | None:
    url: str = spec["url"]
    names = _PLACEHOLDER.findall(url)
    ok = True
    for name in names:
        if name not in spec["secrets"]:
            known = ", ".join(sorted(spec["secrets"])) or "none"
            build.issues.append(
                doc.issue(("spec", "url"), f"{{{name}}} names no secret of spec.secrets (given: {known})")
            )
            ok = False
    for name in spec["secrets"]:
        if name not in names:
            build.issues.append(
                doc.issue(("spec", "secrets", name), f"not used: write {{{name}}} where it goes in spec.url")
            )
            ok = False
    password = _URL_PASSWORD.match(url)
    if password and not _PLACEHOLDER.fullmatch(password.group(1)):
        build.issues.append(
            doc.issue(
                ("spec", "url"),
                "holds a password in clear: write {password} in its place and give it under"
                " spec.secrets.password (e.g. {env: SMTP_PASSWORD})",
            )
        )
        ok = False
    summary = None
    if "summary" in spec:
        summary = _build_schedule(build, doc, ("spec", "summary"), spec["summary"])
        if summary is None:
            ok = False
    if not ok:
        return None
    free = spec["repository_min_free"]
    return model.Notifier(
        name=doc.data["metadata"]["name"],
        url=url,
        secrets={
            name: build.secret(doc, ("spec", "secrets", name), reference)
            for name, reference in sorted(spec["secrets"].items())
        },
        events=frozenset(spec["events"]),
        summary=summary,
        rate_limit=model.RateLimit(spec["rate_limit"]["messages"], parse_interval(spec["rate_limit"]["per"])),
        cbt_pending_after=parse_interval(spec["cbt_pending_after"]),
        repository_min_free_bytes=parse_size(free["size"]),
        repository_min_free_percent=float(free["percent"]),
        suspend=spec["suspend"],
        source=_source(doc),
    )


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _build_monitoring(build: _Build, doc: Document, spec: dict[str, Any]) -> model.Monitoring | None:
    listen = None
    if "listen" in spec:
        listen_spec = spec["listen"]
        address: str = listen_spec["address"]
        if address != "localhost":
            try:
                ipaddress.ip_address(address)
            except ValueError:
                build.issues.append(
                    doc.issue(("spec", "listen", "address"), f"{address!r} is not an IP address or localhost")
                )
                return None
        if "token" not in listen_spec and not _is_loopback(address):
            build.issues.append(
                doc.issue(
                    ("spec", "listen", "token"),
                    f"required when spec.listen.address is not a loopback address ({address}): give a token"
                    " by reference (e.g. {file: /etc/esxi-reconciler/secrets/http-token}), or bind 127.0.0.1",
                )
            )
            return None
        tls = listen_spec.get("tls")
        listen = model.Listen(
            address=address,
            port=int(listen_spec["port"]),
            token=build.secret(doc, ("spec", "listen", "token"), listen_spec["token"])
            if "token" in listen_spec
            else None,
            tls_cert=PurePosixPath(tls["cert_file"]) if tls else None,
            tls_key=PurePosixPath(tls["key_file"]) if tls else None,
        )
    textfile = spec.get("textfile")
    return model.Monitoring(
        name=doc.data["metadata"]["name"],
        listen=listen,
        textfile=PurePosixPath(textfile) if textfile else None,
        ready_after=parse_interval(spec["ready_after"]),
        source=_source(doc),
    )


_BUILDERS: dict[str, Callable[[_Build, Document, dict[str, Any]], Any]] = {
    "Host": _build_host,
    "Repository": _build_repository,
    "BackupPolicy": _build_backup_policy,
    "VerifyPolicy": _build_verify_policy,
    "CopyPolicy": _build_copy_policy,
    "Notifier": _build_notifier,
    "Monitoring": _build_monitoring,
}


@dataclass(frozen=True)
class _Checked:
    """A document of a known kind after the schema check: its data with defaults, and where it failed."""

    doc: Document
    kind: str
    data: dict[str, Any]
    problems: frozenset[str]
    """Field paths (``spec.ssh.port``) that have schema issues."""

    def clean(self, *path: str) -> bool:
        """Whether the value at ``path`` exists and no schema issue lies at or under it."""
        value: Any = self.data
        for element in path:
            if not isinstance(value, dict) or element not in value:
                return False
            value = value[element]
        prefix = format_path(path)
        return not any(p == prefix or p.startswith((prefix + ".", prefix + "[")) for p in self.problems)


def _check_clean_parts(build: _Build, item: _Checked) -> None:
    """In a policy with schema errors elsewhere, still parse a clean schedule and retention, so their
    errors (bad cron, unknown time zone …) are reported in the same run."""
    zone = "UTC"
    if item.clean("spec", "schedule"):
        sched = _build_schedule(build, item.doc, ("spec", "schedule"), item.data["spec"]["schedule"])
        zone = sched.timezone if sched is not None else zone
    if item.kind in ("BackupPolicy", "CopyPolicy") and item.clean("spec", "retention"):
        _build_retention(build, item.doc, ("spec", "retention"), item.data["spec"]["retention"], zone)


# -- cross-checks ------------------------------------------------------------------------------------


def _where(doc: Document, path: Sequence[PathElement]) -> str:
    line, column = doc.position(path)
    return f"{doc.file}:{line}:{column}"


def _check_names(build: _Build, items: dict[str, list[_Checked]]) -> None:
    for kind, kind_items in items.items():
        first: dict[str, Document] = {}
        for item in kind_items:
            doc = item.doc
            name = doc.data["metadata"]["name"]
            if name in first:
                other = _where(first[name], ("metadata", "name"))
                build.issues.append(
                    doc.issue(
                        ("metadata", "name"), f"duplicate {kind} name {name!r}; first defined at {other}"
                    )
                )
            else:
                first[name] = doc


def _check_reference(
    build: _Build, doc: Document, path: tuple[PathElement, ...], kind: str, name: str, known: Iterable[str]
) -> None:
    names = sorted(known)
    if name not in names:
        hint = suggest(name, names) or (f"; known: {', '.join(names)}" if names else "")
        build.issues.append(doc.issue(path, f"no {kind} named {name!r}{hint}"))


def _check_chains(build: _Build, policy_docs: dict[str, Document], targets: dict[str, str | None]) -> None:
    """``after`` chains: every target exists, no policy waits for itself (directly or in a loop)."""
    reported: set[str] = set()
    for name in sorted(targets):
        seen = [name]
        current = targets[name]
        while current is not None and current in targets and current not in seen:
            seen.append(current)
            current = targets[current]
        if current is not None and current in seen and name not in reported:
            loop = [*seen[seen.index(current) :], current]
            for member in loop[:-1]:
                reported.add(member)
            doc = policy_docs[name]
            build.issues.append(
                doc.issue(
                    ("spec", "schedule", "after"),
                    "schedule chain loops: "
                    + " → ".join(loop)
                    + "; one policy must have a time-based schedule",
                )
            )


def _check_repository_paths(build: _Build, repos: list[tuple[model.RepositoryConfig, Document]]) -> None:
    for i, (repo, doc) in enumerate(repos):
        for other, other_doc in repos[:i]:
            if isinstance(repo.backend, model.S3BackendConfig) or isinstance(
                other.backend, model.S3BackendConfig
            ):
                _check_s3_places(build, repo, doc, other, other_doc)
                continue
            a, b = repo.backend.path, other.backend.path
            if a == b:
                relation = "is the same directory as"
            elif b in a.parents:
                relation = "is inside the directory of"
            elif a in b.parents:
                relation = "contains the directory of"
            else:
                continue
            where = _where(other_doc, ("spec", "backend", "path"))
            message = f"{a} {relation} Repository {other.name!r} ({where})"
            build.issues.append(doc.issue(("spec", "backend", "path"), message))


def _check_s3_places(
    build: _Build,
    repo: model.RepositoryConfig,
    doc: Document,
    other: model.RepositoryConfig,
    other_doc: Document,
) -> None:
    """Two repositories in one bucket must not nest: one's prefix inside the other's would mix them."""
    a, b = repo.backend, other.backend
    if not (isinstance(a, model.S3BackendConfig) and isinstance(b, model.S3BackendConfig)):
        return
    if (a.endpoint, a.bucket) != (b.endpoint, b.bucket):
        return
    pa, pb = f"{a.prefix}/" if a.prefix else "", f"{b.prefix}/" if b.prefix else ""
    if not (pa.startswith(pb) or pb.startswith(pa)):
        return
    relation = "is the same place as" if pa == pb else "overlaps"
    where = _where(other_doc, ("spec", "backend", "prefix"))
    build.issues.append(
        doc.issue(
            ("spec", "backend", "prefix"),
            f"{a.url} {relation} Repository {other.name!r} ({b.url}, {where}); give each its own prefix",
        )
    )


def _check_single(build: _Build, kind: str, items: list[tuple[Any, Document]]) -> None:
    """A kind the config may declare once (Monitoring: one listener, one text file)."""
    for _, doc in items[1:]:
        where = _where(items[0][1], ("kind",))
        message = f"only one {kind} document is allowed; the first is at {where}"
        build.issues.append(doc.issue(("kind",), message))


def _check_host_addresses(build: _Build, hosts: list[tuple[model.Host, Document]]) -> None:
    seen: dict[tuple[str, int], tuple[model.Host, Document]] = {}
    for host, doc in hosts:
        key = (host.address.lower(), host.api.port)
        if key in seen:
            other, other_doc = seen[key]
            build.issues.append(
                doc.issue(
                    ("spec", "address"),
                    f"same address and API port as Host"
                    f" {other.name!r} ({_where(other_doc, ('spec', 'address'))})",
                )
            )
        else:
            seen[key] = (host, doc)


# -- the entry point ---------------------------------------------------------------------------------


def _read(root: Path) -> tuple[list[Document], list[tuple[str, bytes]], list[ConfigIssue]]:
    documents: list[Document] = []
    contents: list[tuple[str, bytes]] = []
    issues: list[ConfigIssue] = []
    for path in find_files(root):
        name = display_name(path, root)
        raw, docs, problems = read_file(path, name)
        if raw is not None:
            contents.append((name, raw))
        documents.extend(docs)
        issues.extend(problems)
    return documents, contents, issues


LOAD_ATTEMPTS = 3


def load_config(
    path: str | os.PathLike[str] | None = None, *, resolve_secrets: bool = False, commit: str | None = None
) -> model.DesiredState:
    """Load, validate and cross-check the config at ``path`` (a directory tree or one file).

    ``path`` defaults to :func:`default_config_dir`. With ``resolve_secrets``, every secret reference is
    also read once (and discarded) so a missing variable, file or credential is reported now.
    ``commit``: the files are an export of this git commit (see :func:`config_revision`).
    Raises :class:`ConfigError` listing every issue.

    The revision (git commit, dirty flag) is asked after the files were read; if the tree changed in
    between (a file written, a commit, a checkout), the revision would name another config than the one
    loaded, so the load is repeated until both agree.
    """
    root = Path(path) if path is not None else default_config_dir()
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        desired = _load(root, resolve_secrets, commit)
        if commit is not None or attempt == LOAD_ATTEMPTS or config_revision(root) == desired.revision:
            return desired
    raise AssertionError("unreachable")


def _load(root: Path, resolve_secrets: bool, commit: str | None) -> model.DesiredState:  # noqa: C901  the load's passes in order (read, check, build, cross-reference); each adds issues, none stops the others
    if not root.exists():
        raise ConfigError([ConfigIssue(str(root), 0, 0, "", "config directory does not exist")])
    documents, contents, issues = _read(root)
    if not documents and not issues:
        issues.append(
            ConfigIssue(
                str(root), 0, 0, "", "no desired-state documents found (looked for *.yaml and *.yml files)"
            )
        )
    build = _Build(issues=issues)

    checked: list[_Checked] = []
    objects: dict[str, list[tuple[Any, Document]]] = {kind: [] for kind in schemas.KINDS}
    for doc in documents:
        kind, problems = validate_document(doc)
        build.issues.extend(problems)
        if kind is None:
            continue
        item = _Checked(doc, kind, apply_defaults(kind, doc.data), frozenset(i.path for i in problems))
        checked.append(item)
        if not problems:
            built = _BUILDERS[kind](build, doc, item.data["spec"])
            if built is not None:
                objects[kind].append((built, doc))
        elif kind in ("BackupPolicy", "VerifyPolicy", "CopyPolicy"):
            _check_clean_parts(build, item)

    named = {
        kind: [c for c in checked if c.kind == kind and c.clean("metadata", "name")] for kind in schemas.KINDS
    }
    _check_names(build, named)
    names = {kind: {c.data["metadata"]["name"] for c in items} for kind, items in named.items()}
    for item in checked:
        for field_name, kind in (("host", "Host"), ("repository", "Repository")):
            if item.kind in ("BackupPolicy", "VerifyPolicy") and item.clean("spec", field_name):
                _check_reference(
                    build, item.doc, ("spec", field_name), kind, item.data["spec"][field_name], names[kind]
                )
        if item.kind == "CopyPolicy":
            for field_name in ("source", "destination"):
                if item.clean("spec", field_name):
                    value = item.data["spec"][field_name]
                    _check_reference(
                        build, item.doc, ("spec", field_name), "Repository", value, names["Repository"]
                    )
            if item.clean("spec", "policies"):
                for position, policy in enumerate(item.data["spec"].get("policies", ())):
                    where: tuple[PathElement, ...] = ("spec", "policies", position)
                    _check_reference(build, item.doc, where, "BackupPolicy", policy, names["BackupPolicy"])
        if item.kind == "VerifyPolicy" and item.clean("spec", "test_restore", "host"):
            host = item.data["spec"].get("test_restore", {}).get("host")
            if host is not None:
                _check_reference(
                    build, item.doc, ("spec", "test_restore", "host"), "Host", host, names["Host"]
                )
        if item.kind in ("BackupPolicy", "VerifyPolicy", "CopyPolicy") and item.clean(
            "spec", "schedule", "after"
        ):
            after = item.data["spec"]["schedule"]["after"]
            _check_reference(
                build, item.doc, ("spec", "schedule", "after"), "BackupPolicy", after, names["BackupPolicy"]
            )
    chains = {
        c.data["metadata"]["name"]: c for c in named["BackupPolicy"] if c.clean("spec", "schedule", "after")
    }
    _check_chains(
        build,
        {name: c.doc for name, c in chains.items()},
        {name: c.data["spec"]["schedule"]["after"] for name, c in chains.items()},
    )
    _check_repository_paths(build, objects["Repository"])
    _check_single(build, "Monitoring", objects["Monitoring"])
    _check_host_addresses(build, objects["Host"])

    if resolve_secrets:
        for secret, doc, secret_path in build.secrets:
            try:
                secret.check()
            except SecretError as error:
                build.issues.append(doc.issue(secret_path, str(error)))

    if build.issues:
        rejected = ConfigError(build.issues)
        # The Notifier documents that are valid on their own: the daemon tells its owner about the
        # invalid config through them (at start-up there is no earlier config to take them from).
        rejected.notifiers = tuple(obj for obj, _ in objects["Notifier"])
        # The Monitoring document, when valid and alone: /readyz and the status page say why nothing runs.
        if len(objects["Monitoring"]) == 1:
            rejected.monitoring = objects["Monitoring"][0][0]
        raise rejected
    return model.DesiredState.build(
        hosts=(obj for obj, _ in objects["Host"]),
        repositories=(obj for obj, _ in objects["Repository"]),
        policies=(obj for obj, _ in objects["BackupPolicy"]),
        verify_policies=(obj for obj, _ in objects["VerifyPolicy"]),
        copy_policies=(obj for obj, _ in objects["CopyPolicy"]),
        revision=config_revision(root, contents, commit=commit),
        warnings=build.warnings,
        notifiers=(obj for obj, _ in objects["Notifier"]),
        monitoring=objects["Monitoring"][0][0] if objects["Monitoring"] else None,
    )
