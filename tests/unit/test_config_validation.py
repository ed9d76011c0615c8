"""Invalid desired states: every error found in one run, each with its exact place and message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from reconciler.config import ConfigError, ConfigIssue, load_config

THUMB = "11:F6:AD:8E:C5:2A:29:84:AB:AA:FD:7C:3B:51:65:03:78:5C:20:72"
HOST_KEY = "SHA256:glTDKakoUPbVOd03b0gW7idkUX2l4CNVFK9DMWRIDXo"

HOST = f"""\
apiVersion: esxi-reconciler/v1
kind: Host
metadata:
  name: esxi1
spec:
  address: esxi1.lan
  credentials:
    user: root
    password: {{env: ESXI1_PASSWORD}}
  api: {{thumbprint: "{THUMB}"}}
  ssh:
    port: 22
    host_key: "{HOST_KEY}"
"""

REPOSITORY = """\
apiVersion: esxi-reconciler/v1
kind: Repository
metadata:
  name: nas
spec:
  backend: {type: local, path: /srv/backups}
  encryption: {enabled: false}
"""

POLICY = """\
apiVersion: esxi-reconciler/v1
kind: BackupPolicy
metadata:
  name: nightly
spec:
  host: esxi1
  repository: nas
  vms: {names: [web01]}
  schedule:
    daily: {at: "02:00"}
  retention:
    keep_daily: 7
"""

BASE = {"hosts/esxi1.yaml": HOST, "repositories.yaml": REPOSITORY, "policies/nightly.yaml": POLICY}


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def errors(root: Path, files: dict[str, str]) -> list[str]:
    """The formatted issues of BASE with ``files`` replacing or adding files."""
    write(root, {**BASE, **files})
    with pytest.raises(ConfigError) as caught:
        load_config(root)
    return [str(issue) for issue in caught.value.issues]


def policy(spec: str, name: str = "nightly") -> str:
    """A BackupPolicy document with the given (indented by 2) spec body."""
    body = textwrap.indent(textwrap.dedent(spec), "  ")
    return f"apiVersion: esxi-reconciler/v1\nkind: BackupPolicy\nmetadata:\n  name: {name}\nspec:\n{body}"


def test_base_is_valid(tmp_path: Path) -> None:
    """The fixture itself loads, so each case below fails only for its own reason."""
    write(tmp_path, BASE)
    desired = load_config(tmp_path)
    assert list(desired.hosts) == ["esxi1"]


def test_the_documented_example_message(tmp_path: Path) -> None:
    """The exact format of the issue: file relative to the config dir, line:column, path, message."""
    host = HOST.replace("    port: 22\n", "    port: 70000\n")
    assert host.splitlines()[11] == "    port: 70000"  # line 12, the key at column 5
    assert errors(tmp_path, {"hosts/esxi1.yaml": host}) == [
        "hosts/esxi1.yaml:12:5 spec.ssh.port: 70000 is greater than the maximum of 65535"
    ]


def test_all_errors_of_all_files_at_once_sorted(tmp_path: Path) -> None:
    host = HOST.replace("    port: 22\n", "    port: 0\n").replace("address: esxi1.lan", "adress: esxi1.lan")
    found = errors(
        tmp_path, {"hosts/esxi1.yaml": host, "policies/nightly.yaml": POLICY.replace("esxi1", "esx1")}
    )
    assert found == [
        "hosts/esxi1.yaml:5:1 spec: missing required field 'address'",
        "hosts/esxi1.yaml:6:3 spec.adress: unknown field 'adress'; did you mean 'address'?",
        "hosts/esxi1.yaml:12:5 spec.ssh.port: 0 is less than the minimum of 1",
        "policies/nightly.yaml:6:3 spec.host: no Host named 'esx1'; did you mean 'esxi1'?",
    ]


def test_config_error_lists_issues_as_values(tmp_path: Path) -> None:
    write(tmp_path, {**BASE, "hosts/esxi1.yaml": HOST.replace("port: 22", "port: 70000")})
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    issue = caught.value.issues[0]
    assert issue == ConfigIssue(
        "hosts/esxi1.yaml", 12, 5, "spec.ssh.port", "70000 is greater than the maximum of 65535"
    )
    assert "1 configuration error:" in str(caught.value)
    assert issue.to_dict()["line"] == 12


# One invalid input per case: the files replacing BASE's, and the complete, exact list of issues.
CASES: list[tuple[str, dict[str, str], list[str]]] = [
    (
        "wrong type",
        {"hosts/esxi1.yaml": HOST.replace("port: 22", "port: twenty-two")},
        ["hosts/esxi1.yaml:12:5 spec.ssh.port: expected an integer, got 'twenty-two'"],
    ),
    (
        "number with leading zero stays a string",
        {"hosts/esxi1.yaml": HOST.replace("port: 22", "port: 022")},
        [
            "hosts/esxi1.yaml:12:5 spec.ssh.port: expected an integer, got '022'; write the number without"
            " leading zeros"
        ],
    ),
    (
        "number where a string is expected",
        {"hosts/esxi1.yaml": HOST.replace("user: root", "user: 0")},
        [
            "hosts/esxi1.yaml:8:5 spec.credentials.user: expected a string, got 0; quote it if a string"
            ' was meant: "0"'
        ],
    ),
    (
        "cbt: yes suggests enabled",
        {"policies/nightly.yaml": POLICY + "  cbt: yes\n"},
        [
            "policies/nightly.yaml:13:3 spec.cbt: 'yes' is not one of 'enabled', 'disabled', 'unmanaged';"
            " did you mean 'enabled'?"
        ],
    ),
    (
        "cbt: off suggests disabled",
        {"policies/nightly.yaml": POLICY + "  cbt: off\n"},
        [
            "policies/nightly.yaml:13:3 spec.cbt: 'off' is not one of 'enabled', 'disabled', 'unmanaged';"
            " did you mean 'disabled'?"
        ],
    ),
    (
        "cbt: true suggests enabled",
        {"policies/nightly.yaml": POLICY + "  cbt: true\n"},
        [
            "policies/nightly.yaml:13:3 spec.cbt: true is not one of 'enabled', 'disabled', 'unmanaged';"
            " did you mean 'enabled'?"
        ],
    ),
    (
        "yes is not a boolean",
        {"policies/nightly.yaml": POLICY + "  quiesce: yes\n"},
        [
            "policies/nightly.yaml:13:3 spec.quiesce: expected true or false, got 'yes'; write true or false"
            " (yes/no/on/off are not booleans here)"
        ],
    ),
    (
        "manual: yes",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', "manual: yes")},
        [
            "policies/nightly.yaml:10:5 spec.schedule.manual: expected true, got 'yes' (yes/on are not"
            " booleans here)"
        ],
    ),
    (
        "unknown field, exact place of the key, with a suggestion",
        {"hosts/esxi1.yaml": HOST.replace("    port: 22\n", "    port: 22\n    hostkey: x\n")},
        ["hosts/esxi1.yaml:13:5 spec.ssh.hostkey: unknown field 'hostkey'; did you mean 'host_key'?"],
    ),
    (
        "unknown top-level field",
        {"repositories.yaml": REPOSITORY + "status: {}\n"},
        ["repositories.yaml:8:1 status: unknown field 'status'"],
    ),
    (
        "wrong apiVersion",
        {"repositories.yaml": REPOSITORY.replace("esxi-reconciler/v1", "v1")},
        ["repositories.yaml:1:1 apiVersion: unsupported apiVersion 'v1'; expected 'esxi-reconciler/v1'"],
    ),
    (
        "unknown kind",
        {"repositories.yaml": REPOSITORY.replace("kind: Repository", "kind: Repo")},
        [
            "policies/nightly.yaml:7:3 spec.repository: no Repository named 'nas'",
            "repositories.yaml:2:1 kind: unknown kind 'Repo'; expected one of Host, Repository, BackupPolicy,"
            " VerifyPolicy, CopyPolicy, Notifier, Monitoring; did you mean 'Repository'?",
        ],
    ),
    (
        "missing kind",
        {"extra.yaml": "apiVersion: esxi-reconciler/v1\nmetadata: {name: x}\nspec: {}\n"},
        ["extra.yaml:1:1 missing required field 'kind'"],
    ),
    (
        "document is not a mapping",
        {"extra.yaml": "- apiVersion: esxi-reconciler/v1\n"},
        ["extra.yaml:1:1 a document must be a mapping with apiVersion, kind, metadata and spec"],
    ),
    (
        "bad name",
        {"repositories.yaml": REPOSITORY.replace("name: nas", "name: NAS_1")},
        [
            "policies/nightly.yaml:7:3 spec.repository: no Repository named 'nas'",
            "repositories.yaml:4:3 metadata.name: 'NAS_1' is not a name of 1-63 lower-case letters, digits,"
            " '.', '_' or '-', starting and ending with a letter or digit",
        ],
    ),
    (
        "plaintext password",
        {"hosts/esxi1.yaml": HOST.replace("{env: ESXI1_PASSWORD}", "hunter2")},
        [
            "hosts/esxi1.yaml:9:5 spec.credentials.password: plaintext secrets are not allowed in the config;"
            " reference it instead: {env: NAME} (environment variable), {file: /absolute/path} (a file only"
            " its owner can read: chmod 600) or {credential: NAME} (systemd LoadCredential=NAME:/path)"
        ],
    ),
    (
        "secret reference with two sources",
        {"hosts/esxi1.yaml": HOST.replace("{env: ESXI1_PASSWORD}", "{env: A, file: /etc/a}")},
        [
            "hosts/esxi1.yaml:9:5 spec.credentials.password: a secret reference has exactly one of env, file"
            " or credential; reference it instead: {env: NAME} (environment variable), {file: /absolute/path}"
            " (a file only its owner can read: chmod 600) or {credential: NAME} (systemd"
            " LoadCredential=NAME:/path)"
        ],
    ),
    (
        "secret file path must be absolute",
        {"hosts/esxi1.yaml": HOST.replace("{env: ESXI1_PASSWORD}", "{file: secrets/pw}")},
        ["hosts/esxi1.yaml:9:16 spec.credentials.password.file: is not an absolute path"],
    ),
    (
        "unknown secret source",
        {"hosts/esxi1.yaml": HOST.replace("{env: ESXI1_PASSWORD}", "{vault: pw}")},
        ["hosts/esxi1.yaml:9:16 spec.credentials.password.vault: unknown field 'vault'"],
    ),
    (
        "missing thumbprint explains how to pin",
        {"hosts/esxi1.yaml": HOST.replace(f'{{thumbprint: "{THUMB}"}}', "{port: 443}")},
        [
            "hosts/esxi1.yaml:10:3 spec.api: missing required field 'thumbprint': pin the host's certificate"
            " (openssl s_client -connect HOST:443 </dev/null | openssl x509 -noout -fingerprint -sha256), or"
            " set insecure_skip_tls_verify: true (lab only)"
        ],
    ),
    (
        "bad thumbprint",
        {"hosts/esxi1.yaml": HOST.replace(THUMB, "11:F6:AD")},
        [
            "hosts/esxi1.yaml:10:9 spec.api.thumbprint: '11:F6:AD' is not a SHA-1 or SHA-256 certificate"
            " thumbprint as colon-separated hex pairs (AA:BB:…, 20 or 32 pairs)"
        ],
    ),
    (
        "thumbprint and insecure contradict",
        {"hosts/esxi1.yaml": HOST.replace('"}', '", insecure_skip_tls_verify: true}')},
        [
            "hosts/esxi1.yaml:10:84 spec.api.insecure_skip_tls_verify: contradicts the pinned thumbprint;"
            " remove one of them"
        ],
    ),
    (
        "bad host key",
        {"hosts/esxi1.yaml": HOST.replace(HOST_KEY, "MD5:aa:bb")},
        [
            "hosts/esxi1.yaml:13:5 spec.ssh.host_key: 'MD5:aa:bb' is not an SSH host key fingerprint such as"
            " SHA256:2Y3k… (as printed by ssh-keygen -lf)"
        ],
    ),
    (
        "free host without ssh",
        {
            "hosts/esxi1.yaml": HOST.replace(
                "  ssh:\n    port: 22\n", "  license: free\n  ssh:\n    enabled: false\n"
            )
        },
        [
            "hosts/esxi1.yaml:13:5 spec.ssh.enabled: a free-licensed host is driven over SSH (its API is"
            " read-only); enable ssh"
        ],
    ),
    (
        "two hosts with one address",
        {"hosts/esxi2.yaml": HOST.replace("name: esxi1", "name: esxi2").replace("esxi1.lan", "ESXI1.lan")},
        [
            "hosts/esxi2.yaml:6:3 spec.address: same address and API port as Host 'esxi1'"
            " (hosts/esxi1.yaml:6:3)"
        ],
    ),
    (
        "bad size",
        {"hosts/esxi1.yaml": HOST + "  limits: {min_datastore_free: {size: lots}}\n"},
        [
            "hosts/esxi1.yaml:14:33 spec.limits.min_datastore_free.size: 'lots' is not a size such as 500MiB,"
            " 20GiB or 1TB (or a number of bytes)"
        ],
    ),
    (
        "encryption enabled without key",
        {"repositories.yaml": REPOSITORY.replace("enabled: false", "enabled: true")},
        [
            "repositories.yaml:7:3 spec.encryption: missing required field 'key': encryption is enabled,"
            " so the"
            " repository needs a key; reference it instead: {env: NAME} (environment variable), {file:"
            " /absolute/path} (a file only its owner can read: chmod 600) or {credential: NAME} (systemd"
            " LoadCredential=NAME:/path)"
        ],
    ),
    (
        "encryption must be stated",
        {"repositories.yaml": REPOSITORY.replace("  encryption: {enabled: false}\n", "")},
        ["repositories.yaml:5:1 spec: missing required field 'encryption'"],
    ),
    (
        "unknown backend type",
        {"repositories.yaml": REPOSITORY.replace("type: local", "type: sftp")},
        ["repositories.yaml:6:13 spec.backend.type: 'sftp' is not one of 'local', 's3'"],
    ),
    (
        "relative repository path",
        {"repositories.yaml": REPOSITORY.replace("/srv/backups", "backups")},
        ["repositories.yaml:6:26 spec.backend.path: 'backups' is not an absolute path"],
    ),
    (
        "nested repositories",
        {
            "more.yaml": REPOSITORY.replace("name: nas", "name: inner").replace(
                "/srv/backups", "/srv/backups/x/"
            )
        },
        [
            "repositories.yaml:6:26 spec.backend.path: /srv/backups contains the directory of Repository"
            " 'inner' (more.yaml:6:26)"
        ],
    ),
    (
        "duplicate names across files",
        {"more.yaml": REPOSITORY.replace("/srv/backups", "/srv/other")},
        [
            "repositories.yaml:4:3 metadata.name: duplicate Repository name 'nas'; first defined at"
            " more.yaml:4:3"
        ],
    ),
    (
        "same name in different kinds is fine, missing references are not",
        {
            "policies/nightly.yaml": policy(
                "host: nas\nrepository: esxi1\nvms: {all: true}\nschedule: {every: 6h}\nretention:"
                " {keep_last: 3}\n"
            )
        },
        [
            "policies/nightly.yaml:6:3 spec.host: no Host named 'nas'; known: esxi1",
            "policies/nightly.yaml:7:3 spec.repository: no Repository named 'esxi1'; known: nas",
        ],
    ),
    (
        "vms needs a selection",
        {"policies/nightly.yaml": POLICY.replace("{names: [web01]}", "{exclude: [test*]}")},
        ["policies/nightly.yaml:8:3 spec.vms: needs at least one of names, patterns, all"],
    ),
    (
        "vms all with names",
        {"policies/nightly.yaml": POLICY.replace("{names: [web01]}", "{all: true, names: [web01]}")},
        [
            "policies/nightly.yaml:8:9 spec.vms.all: all: true already selects every VM; remove names and"
            " patterns, or all"
        ],
    ),
    (
        "empty name list",
        {"policies/nightly.yaml": POLICY.replace("[web01]", "[]")},
        ["policies/nightly.yaml:8:9 spec.vms.names: needs at least 1 item"],
    ),
    (
        "two schedule forms",
        {
            "policies/nightly.yaml": POLICY.replace(
                'daily: {at: "02:00"}', 'daily: {at: "02:00"}\n    every: 6h'
            )
        },
        [
            "policies/nightly.yaml:9:3 spec.schedule: takes exactly one of once, every, daily, weekly,"
            " monthly,"
            " cron, after, manual; found every and daily"
        ],
    ),
    (
        "no schedule form",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', "timezone: UTC")},
        [
            "policies/nightly.yaml:9:3 spec.schedule: needs exactly one of once, every, daily, weekly,"
            " monthly,"
            " cron, after, manual"
        ],
    ),
    (
        "sexagesimal-looking time stays a string and is refused",
        {"policies/nightly.yaml": POLICY.replace('"02:00"', "2:00")},
        [
            "policies/nightly.yaml:10:13 spec.schedule.daily.at: '2:00' is not a time of day as HH:MM,"
            ' 24-hour, e.g. "02:00"'
        ],
    ),
    (
        "bad cron from the engine's parser",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', 'cron: "0 25 * * *"')},
        [
            "policies/nightly.yaml:10:5 spec.schedule.cron: cron expression '0 25 * * *': hour field '25':"
            " 25 is out of range 0-23"
        ],
    ),
    (
        "cron with 6 fields",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', 'cron: "0 0 2 * * *"')},
        [
            "policies/nightly.yaml:10:5 spec.schedule.cron: cron expression '0 0 2 * * *': expected 5 fields"
            " (minute hour day-of-month month day-of-week), got 6 (seconds and year fields are not supported)"
        ],
    ),
    (
        "unknown time zone, and a bad cron in the same schedule",
        {
            "policies/nightly.yaml": POLICY.replace(
                'daily: {at: "02:00"}', 'cron: "61 * * * *"\n    timezone: Europe/Berln'
            )
        },
        [
            "policies/nightly.yaml:10:5 spec.schedule.cron: cron expression '61 * * * *': minute field"
            " '61': 61"
            " is out of range 0-59",
            "policies/nightly.yaml:11:5 spec.schedule.timezone: unknown time zone 'Europe/Berln': expected an"
            " IANA name such as 'Europe/Berlin' or 'UTC'",
        ],
    ),
    (
        "interval too short",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', "every: 30s")},
        [
            "policies/nightly.yaml:10:5 spec.schedule.every: periodic schedule interval must be at least 1"
            " minute, got 30s"
        ],
    ),
    (
        "bad weekday",
        {
            "policies/nightly.yaml": POLICY.replace(
                'daily: {at: "02:00"}', 'weekly: {days: [mon, funday], at: "03:00"}'
            )
        },
        [
            "policies/nightly.yaml:10:26 spec.schedule.weekly.days[1]: 'funday' is not one of 'mon', 'tue',"
            " 'wed', 'thu', 'fri', 'sat', 'sun'"
        ],
    ),
    (
        "monthly day out of range",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', 'monthly: {day: 32, at: "03:00"}')},
        [
            "policies/nightly.yaml:10:15 spec.schedule.monthly.day: 32 is not a day of the month, 1-31 or the"
            " last day of the month"
        ],
    ),
    (
        "impossible one-time date",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', "once: 2026-13-01T02:00")},
        ["policies/nightly.yaml:10:5 spec.schedule.once: month must be in 1..12"],
    ),
    (
        "empty window",
        {
            "policies/nightly.yaml": POLICY.replace(
                'daily: {at: "02:00"}', 'daily: {at: "02:00"}\n    window: {start: "01:00", end: "01:00"}'
            )
        },
        [
            "policies/nightly.yaml:11:5 spec.schedule.window: window start and end are both 01:00: a window"
            " must have a length (omit the window to allow any time)"
        ],
    ),
    (
        "after a policy that does not exist",
        {"policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', "after: nightlyy")},
        [
            "policies/nightly.yaml:10:5 spec.schedule.after: no BackupPolicy named 'nightlyy'; did you"
            " mean 'nightly'?"
        ],
    ),
    (
        "after chain loops",
        {
            "policies/nightly.yaml": POLICY.replace('daily: {at: "02:00"}', "after: weekly"),
            "policies/weekly.yaml": POLICY.replace("name: nightly", "name: weekly").replace(
                'daily: {at: "02:00"}', "after: nightly"
            ),
        },
        [
            "policies/nightly.yaml:10:5 spec.schedule.after: schedule chain loops: nightly → weekly →"
            " nightly;"
            " one policy must have a time-based schedule"
        ],
    ),
    (
        "empty retention",
        {"policies/nightly.yaml": POLICY.replace("    keep_daily: 7\n", "    timezone: UTC\n")},
        [
            "policies/nightly.yaml:11:3 spec.retention: needs at least one of keep_last, keep_hourly,"
            " keep_daily,"
            " keep_weekly, keep_monthly, keep_yearly, keep_within"
        ],
    ),
    (
        "zero count",
        {"policies/nightly.yaml": POLICY.replace("keep_daily: 7", "keep_daily: 0")},
        ["policies/nightly.yaml:12:5 spec.retention.keep_daily: 0 is less than the minimum of 1"],
    ),
    (
        "zero keep_within from the engine's parser",
        {"policies/nightly.yaml": POLICY.replace("keep_daily: 7", "keep_within: 0d")},
        [
            "policies/nightly.yaml:12:5 spec.retention.keep_within: duration '0d' is zero: keep-within"
            " must be"
            " longer than zero (or omitted)"
        ],
    ),
    (
        "minutes are not a calendar unit",
        {"policies/nightly.yaml": POLICY.replace("keep_daily: 7", "keep_within: 90s")},
        [
            "policies/nightly.yaml:12:5 spec.retention.keep_within: '90s' is not a calendar duration such"
            " as 36h,"
            " 30d, 2w, 6m (months) or 1y6m"
        ],
    ),
    (
        "power cycle without a window",
        {"policies/nightly.yaml": POLICY + "  cbt_power_cycle: {allowed: true}\n"},
        [
            "policies/nightly.yaml:13:3 spec.cbt_power_cycle: missing required field 'window': allowed: true"
            " needs a maintenance window (start, end, optional days)"
        ],
    ),
    (
        "hook without command",
        {"policies/nightly.yaml": POLICY + "  hooks:\n    pre:\n      - command: []\n"},
        ["policies/nightly.yaml:15:9 spec.hooks.pre[0].command: needs at least 1 item"],
    ),
    (
        "duplicate list entries",
        {"policies/nightly.yaml": POLICY.replace("[web01]", "[web01, web01]")},
        ["policies/nightly.yaml:8:9 spec.vms.names: contains the same item twice"],
    ),
    (
        "verify policy of a missing repository",
        {
            "verify.yaml": "apiVersion: esxi-reconciler/v1\nkind: VerifyPolicy\nmetadata: {name: check}\n"
            "spec:\n  repository: nsa\n  schedule: {manual: true}\n  read_data_percent: 150\n"
        },
        [
            "verify.yaml:5:3 spec.repository: no Repository named 'nsa'; did you mean 'nas'?",
            "verify.yaml:7:3 spec.read_data_percent: 150 is greater than the maximum of 100",
        ],
    ),
]


@pytest.mark.parametrize(("files", "expected"), [(f, e) for _, f, e in CASES], ids=[c[0] for c in CASES])
def test_invalid_input(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    assert errors(tmp_path, files) == expected


def test_there_are_at_least_thirty_distinct_invalid_inputs() -> None:
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope")
    assert [str(i) for i in caught.value.issues] == [f"{tmp_path / 'nope'} config directory does not exist"]


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert [i.message for i in caught.value.issues] == [
        "no desired-state documents found (looked for *.yaml and *.yml files)"
    ]


def copy_policy(spec: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec), "  ")
    return f"apiVersion: esxi-reconciler/v1\nkind: CopyPolicy\nmetadata:\n  name: offsite\nspec:\n{body}"


COPY_SPEC = """\
source: nas
destination: nas
schedule: {after: nightly}
retention: {keep_daily: 0}
policies: [nightly, weekly]
max_age: 3 weeks
"""


def test_copy_policy_errors_name_the_field_and_the_fix(tmp_path: Path) -> None:
    found = errors(tmp_path, {"policies/copy.yaml": copy_policy(COPY_SPEC)})
    assert found == [
        "policies/copy.yaml:9:15 spec.retention.keep_daily: 0 is less than the minimum of 1",
        "policies/copy.yaml:10:23 spec.policies[1]: no BackupPolicy named 'weekly'; known: nightly",
        "policies/copy.yaml:11:3 spec.max_age: '3 weeks' is not a duration such as 30s, 15m, 6h, 7d, 2w or"
        " 1h30m",
    ]
    fixed = COPY_SPEC.replace("keep_daily: 0", "keep_daily: 3").replace(", weekly", "")
    found = errors(tmp_path, {"policies/copy.yaml": copy_policy(fixed.replace("3 weeks", "3w"))})
    assert found == [
        "policies/copy.yaml:7:3 spec.destination: is the source repository; copy to another Repository"
    ]
    unknown = fixed.replace("3 weeks", "3w").replace("destination: nas", "destination: clod")
    found = errors(tmp_path, {"policies/copy.yaml": copy_policy(unknown)})
    assert found == ["policies/copy.yaml:7:3 spec.destination: no Repository named 'clod'; known: nas"]
