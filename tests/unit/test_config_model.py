"""The loaded model: engine schedule and retention objects, visible defaults, immutability, lookups."""

from __future__ import annotations

import dataclasses
import textwrap
from datetime import datetime, time, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from reconciler.config import (
    CbtMode,
    DesiredState,
    DiskSelector,
    HookFailure,
    LocalBackendConfig,
    VmSelector,
    load_config,
    parse_interval,
    parse_size,
)
from reconciler.facts.inventory import License
from reconciler.rules import retention, schedule

THUMB256 = ":".join(["AB"] * 32)
HOST_KEY = "SHA256:glTDKakoUPbVOd03b0gW7idkUX2l4CNVFK9DMWRIDXo"

MINIMAL = f"""\
apiVersion: esxi-reconciler/v1
kind: Host
metadata: {{name: esxi1}}
spec:
  address: 10.0.0.1
  credentials: {{user: backup, password: {{env: PW}}}}
  api: {{thumbprint: "{THUMB256.lower()}"}}
  ssh: {{host_key: "{HOST_KEY}"}}
---
apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: /srv/backups/esxi/}}
  encryption: {{enabled: false}}
---
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata: {{name: nightly}}
spec:
  host: esxi1
  repository: nas
  vms: {{names: [web01]}}
  schedule: {{daily: {{at: "02:00"}}}}
  retention: {{keep_daily: 7}}
"""


def load(tmp_path: Path, text: str, extra: str = "") -> DesiredState:
    (tmp_path / "config.yaml").write_text(textwrap.dedent(text) + extra)
    return load_config(tmp_path)


def policy_doc(name: str, spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec), "  ")
    return (
        f"---\napiVersion: esxi-reconciler/v1\nkind: BackupPolicy\nmetadata: {{name: {name}}}\nspec:\n{body}"
    )


def test_defaults_are_visible_in_the_model(tmp_path: Path) -> None:
    desired = load(tmp_path, MINIMAL)
    host = desired.host("esxi1")
    assert host.license is License.AUTO
    assert host.api.port == 443
    assert host.api.thumbprint == THUMB256  # normalised to upper case
    assert host.api.thumbprint_algorithm == "sha256"
    assert host.api.insecure_skip_tls_verify is False
    assert (host.ssh.enabled, host.ssh.port, host.ssh.user) == (True, 22, "backup")  # user from credentials
    assert host.ssh.private_key is None
    assert host.limits.concurrent_backups == 2
    assert host.limits.concurrent_backups_per_datastore == 1
    assert host.limits.min_datastore_free_bytes == 0
    assert host.limits.min_datastore_free_percent == 10.0
    assert host.source.file == "config.yaml" and host.source.line == 1

    repo = desired.repository("nas")
    assert repo.backend == LocalBackendConfig(PurePosixPath("/srv/backups/esxi"))
    assert (repo.compression.algorithm, repo.compression.level) == ("zstd", 1)
    assert (repo.encryption.enabled, repo.encryption.key) == (False, None)
    assert (repo.prune.enabled, repo.prune.max_deletions_per_run) == (False, 100)

    policy = desired.policy("nightly")
    assert policy.cbt is CbtMode.ENABLED
    assert policy.quiesce is False
    assert policy.snapshot_timeout == timedelta(minutes=30)
    assert policy.disks == DiskSelector(include=("*",), exclude=())
    assert policy.vms == VmSelector(all=False, names=("web01",), patterns=(), exclude=())
    assert policy.hooks.pre == () and policy.hooks.post == ()
    assert policy.suspend is False
    assert (policy.cbt_power_cycle.allowed, policy.cbt_power_cycle.window) == (False, None)
    assert policy.cbt_power_cycle.shutdown_timeout == timedelta(minutes=10)
    assert policy.schedule == schedule.Schedule(schedule.Daily(time(2, 0)), "UTC", None, timedelta(0))
    assert policy.retention == retention.RetentionPolicy(keep_daily=7, timezone="UTC")


def test_model_objects_are_frozen(tmp_path: Path) -> None:
    desired = load(tmp_path, MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        desired.host("esxi1").api.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        desired.policy("nightly").name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        desired.hosts["esxi2"] = desired.host("esxi1")  # type: ignore[index]
    with pytest.raises(KeyError):
        desired.host("esxi9")


SCHEDULES: list[tuple[str, Any]] = [
    (
        '{once: "2026-12-24T02:00"}',
        schedule.Once(datetime(2026, 12, 24, 2, 0, tzinfo=ZoneInfo("Asia/Tokyo"))),
    ),
    ('{once: "2026-12-24T02:00+01:00"}', schedule.Once(datetime(2026, 12, 24, 1, 0, tzinfo=timezone.utc))),
    ('{once: "2026-12-24 02:00:30Z"}', schedule.Once(datetime(2026, 12, 24, 2, 0, 30, tzinfo=timezone.utc))),
    ("{every: 1h30m}", schedule.Every(timedelta(hours=1, minutes=30))),
    ("{every: 2w}", schedule.Every(timedelta(weeks=2))),
    ('{daily: {at: "23:59"}}', schedule.Daily(time(23, 59))),
    ('{weekly: {days: [mon, sun], at: "03:00"}}', schedule.Weekly(frozenset({0, 6}), time(3, 0))),
    ('{monthly: {day: 31, at: "04:00"}}', schedule.Monthly(31, time(4, 0))),
    ('{monthly: {day: last, at: "04:00"}}', schedule.Monthly("last", time(4, 0))),
    ('{cron: "*/15 1-5 * jan,jul mon-fri"}', schedule.Cron("*/15 1-5 * jan,jul mon-fri")),
    ('{cron: "@weekly"}', schedule.Cron("@weekly")),
    ("{after: other}", schedule.After("other")),
    ("{manual: true}", schedule.Manual()),
]


@pytest.mark.parametrize(("yaml_form", "spec"), SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_every_schedule_form_builds_the_engine_type(tmp_path: Path, yaml_form: str, spec: Any) -> None:
    form = yaml_form[:-1] + ", timezone: Asia/Tokyo}"
    other = policy_doc(
        "other",
        "host: esxi1\nrepository: nas\nvms: {all: true}\nschedule: {manual: true}\n"
        "retention: {keep_last: 1}\n",
    )
    text = MINIMAL.replace('schedule: {daily: {at: "02:00"}}', f"schedule: {form}") + other
    built = load(tmp_path, text).policy("nightly").schedule
    assert built.spec == spec
    assert built.timezone == "Asia/Tokyo"
    assert built.zone == ZoneInfo("Asia/Tokyo")


def test_window_and_jitter(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'schedule: {daily: {at: "02:00"}}',
        'schedule: {daily: {at: "02:00"}, timezone: Europe/Berlin, jitter: 15m,'
        ' window: {start: "22:00", end: "06:00", days: [fri, sat]}}',
    )
    built = load(tmp_path, text).policy("nightly").schedule
    assert built.window == schedule.Window(time(22, 0), time(6, 0), frozenset({4, 5}))
    assert built.window.crosses_midnight
    assert built.jitter == timedelta(minutes=15)
    # The engine's own functions work on what the config built.
    assert schedule.describe(built).startswith("daily at 02:00 Europe/Berlin, window 22:00–06:00")


def test_retention_forms_and_time_zone_inheritance(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "retention: {keep_daily: 7}",
        "retention: {keep_last: 2, keep_hourly: 24, keep_daily: 7, keep_weekly: 4, keep_monthly: 12,"
        " keep_yearly: 3, keep_within: 1y6m}",
    ).replace('schedule: {daily: {at: "02:00"}}', 'schedule: {daily: {at: "02:00"}, timezone: Asia/Tokyo}')
    keep = load(tmp_path, text).policy("nightly").retention
    assert keep == retention.RetentionPolicy(
        keep_last=2,
        keep_hourly=24,
        keep_daily=7,
        keep_weekly=4,
        keep_monthly=12,
        keep_yearly=3,
        keep_within=retention.CalendarDuration(years=1, months=6),
        timezone="Asia/Tokyo",  # from the schedule
    )
    explicit = MINIMAL.replace("retention: {keep_daily: 7}", "retention: {keep_within: 30d, timezone: UTC}")
    assert load(tmp_path, explicit).policy("nightly").retention.timezone == "UTC"


def test_host_settings(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        f'ssh: {{host_key: "{HOST_KEY}"}}',
        f'ssh: {{host_key: "{HOST_KEY}", port: 2222, user: root, private_key: {{file: /etc/k}}}}\n'
        "  license: free\n"
        "  limits: {concurrent_backups: 4, min_datastore_free: {size: 1.5GiB}}",
    )
    host = load(tmp_path, text).host("esxi1")
    assert host.license is License.FREE
    assert (host.ssh.port, host.ssh.user, str(host.ssh.private_key)) == (2222, "root", "Secret(file:/etc/k)")
    assert host.limits.concurrent_backups == 4
    # Setting min_datastore_free replaces its default: only what is written applies.
    assert host.limits.min_datastore_free_bytes == int(1.5 * 1024**3)
    assert host.limits.min_datastore_free_percent == 0.0
    assert host.limits.datastore_has_room(capacity=100 * 1024**3, free=2 * 1024**3)
    assert not host.limits.datastore_has_room(capacity=100 * 1024**3, free=1024**3)


def test_insecure_opt_outs_load_with_loud_warnings(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        f'{{thumbprint: "{THUMB256.lower()}"}}', "{insecure_skip_tls_verify: true}"
    ).replace(f'{{host_key: "{HOST_KEY}"}}', "{insecure_skip_host_key_check: true}")
    desired = load(tmp_path, text)
    assert desired.host("esxi1").api.thumbprint is None
    assert [str(w) for w in desired.warnings] == [
        "config.yaml:7:9 spec.api.insecure_skip_tls_verify: INSECURE: TLS certificate of host 'esxi1' is not"
        " verified",
        "config.yaml:8:9 spec.ssh.insecure_skip_host_key_check: INSECURE: SSH host key of host 'esxi1' is not"
        " verified",
    ]


def test_licensed_host_without_ssh(tmp_path: Path) -> None:
    text = MINIMAL.replace(f'{{host_key: "{HOST_KEY}"}}', "{enabled: false}")
    host = load(tmp_path, text.replace("address: 10.0.0.1", "address: 10.0.0.1\n  license: licensed")).host(
        "esxi1"
    )
    assert host.ssh.enabled is False and host.ssh.host_key is None


def test_policy_settings(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.indent(
        textwrap.dedent(
            """\
          cbt: unmanaged
          quiesce: true
          snapshot_timeout: 45m
          suspend: true
          disks: {include: ["scsi0:*"], exclude: ["Hard disk 3", "*_scratch.vmdk"]}
          hooks:
            pre: [{command: [/bin/true, "a b"], timeout: 30s}]
            post: [{command: [/bin/false], on_failure: ignore}]
          cbt_power_cycle: {allowed: true, window: {start: "03:00", end: "04:00"}, shutdown_timeout: 5m}
        """
        ),
        "  ",
    )
    desired = load(tmp_path, text)
    policy = desired.policy("nightly")
    assert policy.cbt is CbtMode.UNMANAGED and policy.quiesce and policy.suspend
    assert policy.snapshot_timeout == timedelta(minutes=45)
    assert policy.hooks.pre[0].command == ("/bin/true", "a b")
    assert policy.hooks.pre[0].timeout == timedelta(seconds=30)
    assert policy.hooks.pre[0].on_failure is HookFailure.FAIL
    assert policy.hooks.post[0].timeout == timedelta(minutes=5)
    assert policy.hooks.post[0].on_failure is HookFailure.IGNORE
    assert policy.cbt_power_cycle.window == schedule.Window(time(3, 0), time(4, 0))
    assert policy.cbt_power_cycle.shutdown_timeout == timedelta(minutes=5)
    assert policy.disks.matches("scsi0:0", "Hard disk 1", "web01.vmdk")
    assert not policy.disks.matches("scsi0:2", "Hard disk 3", "web01_2.vmdk")
    assert not policy.disks.matches("scsi0:1", "Hard disk 2", "web01_scratch.vmdk")
    assert not policy.disks.matches("nvme0:0", "Hard disk 4", "web01_3.vmdk")
    assert [str(w) for w in desired.warnings] == [
        "config.yaml:34:21 spec.cbt_power_cycle.allowed: has no effect: cbt is unmanaged"
    ]


def test_vm_selection() -> None:
    by_name = VmSelector(
        all=False, names=("web01", "db 01"), patterns=("app*",), exclude=("*-test", "app203")
    )
    assert by_name.select(["web01", "db 01", "db01", "app201", "app203", "app9-test", "WEB01"]) == (
        "web01",
        "db 01",
        "app201",
    )
    every = VmSelector(all=True, names=(), patterns=(), exclude=("[[]tmp]*",))
    assert every.matches('ファイル鯖 "q" $(x)')
    assert not every.matches("[tmp] scratch")


def test_several_policies_per_vm_and_lookups(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + policy_doc(
            "weekly",
            'host: esxi1\nrepository: nas\nvms: {patterns: ["web*"]}\n'
            'schedule: {weekly: {days: [sat], at: "03:00"}}\nretention: {keep_weekly: 8}\n',
        )
        + policy_doc(
            "after-weekly",
            "host: esxi1\nrepository: nas\nvms: {all: true, exclude: [web01]}\nschedule: {after: weekly}\n"
            "retention: {keep_last: 3}\n",
        )
    )
    desired = load(tmp_path, text)
    assert list(desired.policies) == ["after-weekly", "nightly", "weekly"]  # ordered by name
    assert [p.name for p in desired.policies_for_vm("esxi1", "web01")] == ["nightly", "weekly"]
    assert [p.name for p in desired.policies_for_vm("esxi1", "db01")] == ["after-weekly"]
    assert desired.policies_for_vm("esxi2", "web01") == ()
    assert [p.name for p in desired.policies_for_host("esxi1")] == ["after-weekly", "nightly", "weekly"]
    assert [p.name for p in desired.policies_for_repository("nas")] == ["after-weekly", "nightly", "weekly"]
    assert [p.name for p in desired.dependents("weekly")] == ["after-weekly"]
    assert desired.dependents("nightly") == ()


def test_verify_policy(tmp_path: Path) -> None:
    text = MINIMAL + (
        "---\napiVersion: esxi-reconciler/v1\nkind: VerifyPolicy\nmetadata: {name: scrub}\n"
        "spec: {repository: nas, schedule: {after: nightly}}\n"
    )
    scrub = load(tmp_path, text).verify_policy("scrub")
    assert scrub.repository == "nas"
    assert scrub.schedule.spec == schedule.After("nightly")
    assert (scrub.read_data_percent, scrub.suspend) == (100.0, False)


@pytest.mark.parametrize(
    ("text", "value"),
    [("30s", timedelta(seconds=30)), ("1h30m", timedelta(minutes=90)), ("2w1d", timedelta(days=15))],
)
def test_parse_interval(text: str, value: timedelta) -> None:
    assert parse_interval(text) == value


@pytest.mark.parametrize("text", ["", "5", "1x", "m5", "1h 30m"])
def test_parse_interval_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_interval(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (0, 0),
        (123, 123),
        ("20GiB", 20 * 1024**3),
        ("500MB", 500 * 10**6),
        ("1.5 TiB", int(1.5 * 1024**4)),
        ("7", 7),
        ("7B", 7),
    ],
)
def test_parse_size(text: int | str, value: int) -> None:
    assert parse_size(text) == value
