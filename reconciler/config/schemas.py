"""The JSON Schemas (draft 2020-12) of every desired-state kind.

This module is the single source: ``schemas/*.schema.json`` are generated from it
(``python -m reconciler.config.docgen --schemas schemas/``; a test fails when they differ), the validator uses
these dicts directly (so validating needs no data files), and ``docs/config.md`` is
generated from them by :mod:`reconciler.config.docgen`. ``schemas/`` links to ``reconciler/schemas/``:
the files are package data, for editors (``esxi-reconciler schema KIND --path``).

Each per-kind schema is self-contained (shared definitions are copied into its ``$defs``), so an
editor can use one file alone, e.g. ``# yaml-language-server: $schema=../schemas/host.schema.json``.
``esxi-reconciler.schema.json`` accepts any kind, for files that mix kinds.

Conventions: snake_case field names; every field has a ``description``; every object has
``additionalProperties: false``; defaults are given with ``default`` and applied after validation.
Secret references are marked ``writeOnly`` so error messages about them never echo the value.
"""

from __future__ import annotations

import copy
import json
from typing import Any

Schema = dict[str, Any]

API_VERSION = "esxi-reconciler/v1"
SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "urn:esxi-reconciler:schema:v1:"

KINDS = ("Host", "Repository", "BackupPolicy", "VerifyPolicy", "CopyPolicy", "Notifier", "Monitoring")
"""Every kind of the config directory, in the order the docs present them."""

SOURCE_KIND = "GitSource"
"""The kind of the bootstrap file of ``run --source`` (where the config comes from). Deliberately not in
:data:`KINDS`: a config directory cannot say where it comes from or whose signatures it trusts."""

# -- patterns and what they mean in words (used by error messages and the docs) ----------------------

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
HHMM_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
DURATION_PATTERN = r"^([0-9]+(s|m|h|d|w))+$"
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)? ?(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?$"
THUMBPRINT_PATTERN = r"^([0-9A-Fa-f]{2}:){19}[0-9A-Fa-f]{2}$|^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$"
HOST_KEY_PATTERN = r"^SHA256:[A-Za-z0-9+/]{43}=?$"
ADDRESS_PATTERN = r"^[A-Za-z0-9:]([A-Za-z0-9.:%_-]*[A-Za-z0-9])?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
CREDENTIAL_NAME_PATTERN = r"^[A-Za-z0-9_.@-]+$"
ABSOLUTE_PATH_PATTERN = r"^/"
DATETIME_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2})?(Z|[+-][0-9]{2}:[0-9]{2})?$"
CALENDAR_DURATION_PATTERN = r"^([0-9]+(h|d|w|m|y))+$"
TIMEZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"
NOTIFY_URL_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$"
PLACEHOLDER_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
GIT_URL_PATTERN = (
    r"^(ssh://[^@/\s]+@[^/\s]+/\S+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:\S+|file:///\S*|https?://[^/\s]+/\S+)$"
)
"""http:// and credentials in an https:// URL pass the pattern on purpose: the loader refuses them with
a message that says what to do instead (and never echoes a token)."""
SSH_PUBLIC_KEY_PATTERN = (
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521"
    r"|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\n]*)?$"
)
OPENPGP_KEY_PATTERN = r"^-----BEGIN PGP PUBLIC KEY BLOCK-----"
RELATIVE_PATH_PATTERN = r"^([^/\s][^\n]*)?$"
S3_ENDPOINT_PATTERN = r"^https?://[^/\s]+/?$"
S3_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
S3_PREFIX_PATTERN = r"^([A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*)?/?$"
LISTEN_ADDRESS_PATTERN = r"^(localhost|[0-9.]+|[0-9A-Fa-f:]+)$"
PROM_FILE_PATTERN = r"^/.*\.prom$"

PATTERN_HINTS: dict[str, str] = {
    NAME_PATTERN: "a name of 1-63 lower-case letters, digits, '.', '_' or '-', starting and ending with a"
    " letter or digit",
    HHMM_PATTERN: 'a time of day as HH:MM, 24-hour, e.g. "02:00"',
    DURATION_PATTERN: "a duration such as 30s, 15m, 6h, 7d, 2w or 1h30m",
    SIZE_PATTERN: "a size such as 500MiB, 20GiB or 1TB (or a number of bytes)",
    THUMBPRINT_PATTERN: "a SHA-1 or SHA-256 certificate thumbprint as colon-separated hex pairs"
    " (AA:BB:…, 20 or 32 pairs)",
    HOST_KEY_PATTERN: "an SSH host key fingerprint such as SHA256:2Y3k… (as printed by ssh-keygen -lf)",
    ADDRESS_PATTERN: "a host name or IP address, without scheme, port or path",
    ENV_NAME_PATTERN: "an environment variable name (letters, digits, '_')",
    CREDENTIAL_NAME_PATTERN: "a systemd credential name (letters, digits, '_', '.', '@', '-')",
    ABSOLUTE_PATH_PATTERN: "an absolute path",
    DATETIME_PATTERN: 'a date and time such as "2026-12-24T02:00" (optionally with Z or an offset like'
    " +09:00)",
    CALENDAR_DURATION_PATTERN: "a calendar duration such as 36h, 30d, 2w, 6m (months) or 1y6m",
    TIMEZONE_PATTERN: "an IANA time zone name such as Europe/Berlin, Asia/Tokyo or UTC",
    NOTIFY_URL_PATTERN: "an apprise URL such as mailtos://user:{password}@smtp.example.com or"
    " ntfys://ntfy.example.com/backups, without spaces",
    PLACEHOLDER_NAME_PATTERN: "a placeholder name of 1-32 lower-case letters, digits or '_', starting with"
    " a letter",
    GIT_URL_PATTERN: "a git URL over SSH with a user (ssh://git@git.example.com:22/infra/esxi.git or"
    " git@git.example.com:infra/esxi.git), over HTTPS (https://git.example.com/infra/esxi.git) or a local"
    " file:///path",
    SSH_PUBLIC_KEY_PATTERN: "an OpenSSH public key line such as 'ssh-ed25519 AAAAC3Nz… comment' (the"
    " content of a .pub file)",
    OPENPGP_KEY_PATTERN: "an ASCII-armoured OpenPGP public key (gpg --armor --export KEYID), starting with"
    " -----BEGIN PGP PUBLIC KEY BLOCK-----",
    RELATIVE_PATH_PATTERN: "a path relative to the repository's top directory, such as esxi or"
    " clusters/nas1 (no leading /)",
    LISTEN_ADDRESS_PATTERN: "an IP address to bind (127.0.0.1, ::1, 0.0.0.0, :: or one of this machine's"
    " addresses) or localhost",
    PROM_FILE_PATTERN: "an absolute path ending in .prom",
}

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SCHEDULE_FORMS = ("once", "every", "daily", "weekly", "monthly", "cron", "after", "manual")
NOTIFY_EVENTS = (
    "backup-failed",
    "recovered",
    "stale",
    "low-space",
    "cbt-pending",
    "verify-damage",
    "test-restore-failed",
    "config-invalid",
    "error",
)
"""What a Notifier can be told about (the README "Notifications" says when each is sent)."""
RETENTION_RULES = (
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_within",
)


def _obj(
    description: str, properties: dict[str, Schema], *, required: tuple[str, ...] = (), **extra: Any
) -> Schema:
    schema: Schema = {"type": "object", "description": description}
    schema.update(extra)
    schema["properties"] = properties
    if required:
        schema["required"] = list(required)
    schema["additionalProperties"] = False
    return schema


def _str(description: str, pattern: str | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "string", "description": description}
    if pattern is not None:
        schema["pattern"] = pattern
    schema.update(extra)
    return schema


def _int(description: str, minimum: int, maximum: int | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "integer", "description": description, "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    schema.update(extra)
    return schema


def _bool(description: str, **extra: Any) -> Schema:
    return {"type": "boolean", "description": description, **extra}


def _ref(name: str, description: str, **extra: Any) -> Schema:
    return {"$ref": f"#/$defs/{name}", "description": description, **extra}


def _if(condition: Schema, *, then: Schema | None = None, otherwise: Schema | None = None) -> dict[str, Any]:
    """``if``/``then``/``else`` keywords (Python reserves the names), to splice into :func:`_obj`."""
    keywords: dict[str, Any] = {"if": condition}
    if then is not None:
        keywords["then"] = then
    if otherwise is not None:
        keywords["else"] = otherwise
    return keywords


def _one_key_of(keys: tuple[str, ...]) -> list[Schema]:
    return [{"required": [key]} for key in keys]


# -- shared definitions ------------------------------------------------------------------------------

DEFS: dict[str, Schema] = {
    "name": _str(
        "Name of an object; unique per kind. Used in restore point names and messages.",
        NAME_PATTERN,
        examples=["esxi1", "nas", "nightly-web"],
    ),
    "duration": _str(
        "A duration: one or more number+unit pairs, units s (seconds), m (minutes), h (hours), d (days),"
        " w (weeks).",
        DURATION_PATTERN,
        examples=["30m", "6h", "1h30m", "14d"],
    ),
    "calendar_duration": _str(
        "A calendar duration: one or more number+unit pairs, units h (hours), d (days), w (weeks),"
        " m (MONTHS), y (years). Months and years are calendar arithmetic in the retention's time zone.",
        CALENDAR_DURATION_PATTERN,
        examples=["30d", "6m", "1y6m"],
    ),
    "time_of_day": _str(
        "A wall-clock time, HH:MM, 24-hour. Always quote it.", HHMM_PATTERN, examples=["02:00"]
    ),
    "timezone": _str(
        "An IANA time zone name, e.g. Europe/Berlin, Asia/Tokyo, UTC.",
        TIMEZONE_PATTERN,
        examples=["Europe/Berlin", "UTC"],
    ),
    "weekday": {
        "type": "string",
        "description": "A day of the week, three lower-case letters.",
        "enum": list(WEEKDAYS),
    },
    "size": {
        "type": ["string", "integer"],
        "description": "An amount of storage: a number of bytes, or a number with a unit (B, KiB, MiB, GiB,"
        " TiB = powers of 1024; KB, MB, GB, TB = powers of 1000).",
        "pattern": SIZE_PATTERN,
        "minimum": 0,
        "examples": ["20GiB", "500MB", 0],
    },
    "secret": {
        "type": "object",
        "description": "A reference to a secret held outside the config; exactly one of env, file or"
        " credential. Plaintext secrets are refused. The value is read only when needed and never"
        " printed or logged.",
        "writeOnly": True,
        "properties": {
            "env": _str("Name of an environment variable holding the secret.", ENV_NAME_PATTERN),
            "file": _str(
                "Absolute path of a file holding the secret (one trailing newline is ignored). The file"
                " must not be readable by group or others (chmod 600).",
                ABSOLUTE_PATH_PATTERN,
            ),
            "credential": _str(
                "Name of a systemd credential (LoadCredential=NAME:/path in the unit), read from"
                " $CREDENTIALS_DIRECTORY/NAME.",
                CREDENTIAL_NAME_PATTERN,
            ),
        },
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "examples": [
            {"env": "ESXI1_PASSWORD"},
            {"file": "/etc/esxi-reconciler/secrets/esxi1"},
            {"credential": "esxi1-password"},
        ],
    },
    "signer": _obj(
        "A key whose signatures on commits are trusted (GitSource verify.signers): exactly one of ssh or"
        " openpgp.",
        {
            "name": _str(
                "Who this is, for messages and status. Default: signer-N (its place in the list).",
                minLength=1,
                examples=["alice"],
            ),
            "ssh": _str(
                "An SSH public key: the .pub of the signer's user.signingkey (git config gpg.format ssh).",
                SSH_PUBLIC_KEY_PATTERN,
            ),
            "openpgp": _str(
                "An OpenPGP public key, ASCII-armoured (gpg --armor --export KEYID); its primary key or"
                " a subkey must have made the signature.",
                OPENPGP_KEY_PATTERN,
            ),
        },
        oneOf=_one_key_of(("ssh", "openpgp")),
    ),
    "window": _obj(
        "A time window, in the schedule's time zone. It may cross midnight (start 22:00, end 06:00)."
        " Nothing starts outside it.",
        {
            "start": _ref("time_of_day", "Start of the window, HH:MM (inclusive)."),
            "end": _ref(
                "time_of_day", "End of the window, HH:MM (exclusive); earlier than start means the next day."
            ),
            "days": {
                "type": "array",
                "description": "Days on which the window opens (a window crossing midnight belongs to the day"
                " it starts on). Default: every day.",
                "items": _ref("weekday", "A day of the week."),
                "minItems": 1,
                "uniqueItems": True,
            },
        },
        required=("start", "end"),
    ),
    "schedule": _obj(
        "When something runs: exactly one of once, every, daily, weekly, monthly, cron, after or manual;"
        " plus an optional time zone, window and jitter.",
        {
            "once": _str(
                "Run once at this date and time (in the schedule's time zone unless it has Z or an offset)."
                " Quote it.",
                DATETIME_PATTERN,
                examples=["2026-12-24T02:00"],
            ),
            "every": _ref(
                "duration",
                "Run periodically at this interval (at least 1m), measured from the start of the previous"
                " run.",
                examples=["6h"],
            ),
            "daily": _obj(
                "Run every day at a time.",
                {"at": _ref("time_of_day", "Time of day, HH:MM.")},
                required=("at",),
            ),
            "weekly": _obj(
                "Run on some days of the week at a time.",
                {
                    "days": {
                        "type": "array",
                        "description": "Days of the week.",
                        "items": _ref("weekday", "A day of the week."),
                        "minItems": 1,
                        "uniqueItems": True,
                    },
                    "at": _ref("time_of_day", "Time of day, HH:MM."),
                },
                required=("days", "at"),
            ),
            "monthly": _obj(
                "Run once a month on a day at a time.",
                {
                    "day": {
                        "description": "Day of the month, 1-31, or last for the month's last day. In months"
                        " that do not have the day (29-31), the run is on the month's last day: no month is"
                        " skipped.",
                        "oneOf": [
                            {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": 31,
                                "description": "A day of the month, 1-31.",
                            },
                            {"const": "last", "description": "The last day of the month."},
                        ],
                    },
                    "at": _ref("time_of_day", "Time of day, HH:MM."),
                },
                required=("day", "at"),
            ),
            "cron": _str(
                "A 5-field cron expression (minute hour day-of-month month day-of-week; Vixie cron"
                " semantics, names like mon-fri and jan allowed) or @hourly, @daily, @weekly, @monthly,"
                " @yearly; in the schedule's time zone.",
                minLength=1,
                examples=["30 2 * * 1-5"],
            ),
            "after": _ref(
                "name",
                "Run after the named BackupPolicy has succeeded (a chain).",
                examples=["nightly-web"],
            ),
            "manual": {
                "const": True,
                "description": "No schedule: runs only when asked for (esxi-reconciler backup). Write"
                " manual: true.",
            },
            "timezone": _ref(
                "timezone",
                "Time zone in which at, once, cron and window times are read. Set it: the default, UTC, is"
                " rarely the local time.",
                default="UTC",
            ),
            "window": _ref(
                "window",
                "Optional allowed window: no run starts outside it; a run due outside"
                " it waits for the next opening.",
            ),
            "jitter": _ref(
                "duration",
                "Optional random delay up to this long added to each start, to spread load.",
                default="0s",
            ),
        },
        oneOf=_one_key_of(SCHEDULE_FORMS),
    ),
    "retention": _obj(
        "Which restore points are kept (see docs/retention.md). At least one rule is required. Rules apply in"
        " the order last, hourly, daily, weekly, monthly, yearly; a period already kept by an earlier rule"
        " costs nothing. The newest successful point is always kept; failed or partial points never count;"
        " points marked protected are never removed.",
        {
            "keep_last": _int("Keep the newest N points.", 1),
            "keep_hourly": _int("Keep the newest point of each of the last N hours that have one.", 1),
            "keep_daily": _int("Keep the newest point of each of the last N days that have one.", 1),
            "keep_weekly": _int(
                "Keep the newest point of each of the last N ISO weeks (Mon-Sun) that have one.", 1
            ),
            "keep_monthly": _int("Keep the newest point of each of the last N months that have one.", 1),
            "keep_yearly": _int("Keep the newest point of each of the last N years that have one.", 1),
            "keep_within": _ref(
                "calendar_duration",
                "Keep every point younger than this, measured back from the newest successful point (not"
                " from now, so history survives when backups stop). Note: m means months here.",
            ),
            "timezone": _ref(
                "timezone",
                "Time zone in which hours, days, weeks, months and years are counted. Default: the"
                " schedule's time zone.",
            ),
        },
        anyOf=_one_key_of(RETENTION_RULES),
    ),
    "hook": _obj(
        "A command run on the machine of the reconciler (not on ESXi, not in the guest).",
        {
            "command": {
                "type": "array",
                "description": "Program and arguments (no shell; use [sh, -c, '...'] if you need one).",
                "items": {"type": "string", "description": "One argument.", "minLength": 1},
                "minItems": 1,
            },
            "timeout": _ref("duration", "The command is killed after this long.", default="5m"),
            "on_failure": {
                "type": "string",
                "description": "fail: a failing pre hook skips the backup and a failing post hook marks the"
                " run failed; ignore: log it and go on.",
                "enum": ["fail", "ignore"],
                "default": "fail",
            },
        },
        required=("command",),
    ),
}

# -- the envelope shared by every kind -------------------------------------------------------------


def _envelope(kind: str, description: str, spec: Schema) -> Schema:
    return _obj(
        description,
        {
            "apiVersion": {"const": API_VERSION, "description": f"Always {API_VERSION}."},
            "kind": {"const": kind, "description": f"Always {kind}."},
            "metadata": _obj(
                "Identity of the object.",
                {"name": _ref("name", f"Name of the {kind}, unique among {kind} objects.")},
                required=("name",),
            ),
            "spec": spec,
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    )


# -- Host --------------------------------------------------------------------------------------------

HOST_SPEC = _obj(
    "A standalone ESXi host (7.0 or 8.0), reached over HTTPS (vSphere API) and SSH.",
    {
        "address": _str(
            "Host name or IP address of the ESXi host.",
            ADDRESS_PATTERN,
            examples=["esxi1.lan", "192.168.10.21"],
        ),
        "license": {
            "type": "string",
            "description": "auto: detect the license on connection; free: the free ESXi license (read-only"
            " API: snapshots and CBT changes go over SSH); licensed: a paid license (everything through the"
            " API).",
            "enum": ["auto", "free", "licensed"],
            "default": "auto",
        },
        "credentials": _obj(
            "Login for the API and (unless ssh.user or ssh.private_key say otherwise) SSH. A dedicated"
            " administrator account is recommended over root.",
            {
                "user": _str("User name.", minLength=1, examples=["backup", "root"]),
                "password": _ref("secret", "The user's password, by reference."),
            },
            required=("user", "password"),
        ),
        "api": _obj(
            "The vSphere API endpoint (HTTPS).",
            {
                "port": _int("HTTPS port.", 1, 65535, default=443),
                "thumbprint": _str(
                    "Pinned certificate thumbprint, SHA-1 or SHA-256 (openssl x509 -noout -fingerprint"
                    " -sha256). The connection is refused if the host presents another certificate. Required"
                    " unless insecure_skip_tls_verify.",
                    THUMBPRINT_PATTERN,
                ),
                "insecure_skip_tls_verify": _bool(
                    "INSECURE: connect without checking the certificate (anyone on the path can read the"
                    " password and the disks). Only for a lab; excludes thumbprint.",
                    default=False,
                ),
            },
            **_if(
                {
                    "properties": {"insecure_skip_tls_verify": {"const": True}},
                    "required": ["insecure_skip_tls_verify"],
                },
                otherwise={"required": ["thumbprint"]},
            ),
        ),
        "ssh": _obj(
            "The SSH endpoint, needed for free-licensed hosts (snapshots, CBT, restore) and optional for"
            " licensed ones (set enabled: false).",
            {
                "enabled": _bool("Whether SSH is used at all.", default=True),
                "port": _int("SSH port.", 1, 65535, default=22),
                "user": _str("SSH user. Default: credentials.user.", minLength=1),
                "host_key": _str(
                    "Pinned host key fingerprint (ssh-keyscan HOST | ssh-keygen -lf -). The connection is"
                    " refused if the host presents another key. Required unless enabled is false or"
                    " insecure_skip_host_key_check.",
                    HOST_KEY_PATTERN,
                ),
                "private_key": _ref(
                    "secret",
                    "Optional private key (OpenSSH format) for SSH, by reference."
                    " Default: log in with credentials.password.",
                ),
                "insecure_skip_host_key_check": _bool(
                    "INSECURE: accept any host key. Only for a lab; excludes host_key.",
                    default=False,
                ),
            },
            **_if(
                {
                    "anyOf": [
                        {"properties": {"enabled": {"const": False}}, "required": ["enabled"]},
                        {
                            "properties": {"insecure_skip_host_key_check": {"const": True}},
                            "required": ["insecure_skip_host_key_check"],
                        },
                    ]
                },
                otherwise={"required": ["host_key"]},
            ),
        ),
        "limits": _obj(
            "Limits that protect the host and its datastores.",
            {
                "concurrent_backups": _int("Most backups running at once on this host.", 1, 64, default=2),
                "concurrent_backups_per_datastore": _int(
                    "Most backups running at once from VMs on one datastore.", 1, 64, default=1
                ),
                "min_datastore_free": _obj(
                    "Free space a datastore must keep: no snapshot is taken if it would leave less"
                    " (snapshots grow while the backup reads). Each field set applies; 0 = no check.",
                    {
                        "size": _ref("size", "Minimum free space, e.g. 20GiB.", default=0),
                        "percent": {
                            "type": "number",
                            "description": "Minimum free space in percent of the datastore's capacity.",
                            "minimum": 0,
                            "maximum": 100,
                            "default": 0,
                        },
                    },
                    default={"percent": 10},
                ),
            },
            default={},
        ),
    },
    required=("address", "credentials", "api", "ssh"),
)

# -- Repository --------------------------------------------------------------------------------------

REPOSITORY_SPEC = _obj(
    "Where restore points are stored.",
    {
        "backend": _obj(
            "The storage behind the repository; type selects the kind: local (a directory) or s3 (a bucket"
            " of S3-compatible object storage: AWS S3, Backblaze B2, Wasabi, MinIO, Garage, Ceph RGW).",
            {
                "type": {
                    "type": "string",
                    "description": "local: a directory on this machine (e.g. a NAS volume). s3: a bucket (and"
                    " prefix) of S3-compatible object storage; several daemons (sites, NAS boxes) may share"
                    " one such repository, with deduplication across all of them.",
                    "enum": ["local", "s3"],
                },
                "path": _str(
                    "local: absolute path of the repository directory.",
                    ABSOLUTE_PATH_PATTERN,
                    examples=["/srv/backups/esxi"],
                ),
                "endpoint": _str(
                    "s3: URL of the service. Default: AWS S3 of the region. B2:"
                    " https://s3.<region>.backblazeb2.com; MinIO, Garage, Ceph RGW: your server's URL.",
                    S3_ENDPOINT_PATTERN,
                    examples=["https://s3.eu-central-003.backblazeb2.com", "https://minio.example.net:9000"],
                ),
                "bucket": _str(
                    "s3: the bucket (it must exist; create it with the service's tools).",
                    S3_BUCKET_PATTERN,
                    examples=["esxi-backups"],
                ),
                "prefix": _str(
                    "s3: key prefix of the repository inside the bucket, so one bucket can hold several"
                    " repositories. Default: the bucket's top.",
                    S3_PREFIX_PATTERN,
                    default="",
                    examples=["esxi/main"],
                ),
                "region": _str(
                    "s3: the region (AWS, B2, Wasabi); S3-compatible servers accept any.",
                    r"^[a-z0-9-]+$",
                    default="us-east-1",
                    examples=["eu-central-1"],
                ),
                "path_style": _bool(
                    "s3: address the bucket as ENDPOINT/BUCKET instead of BUCKET.ENDPOINT (virtual-hosted)."
                    " MinIO, Garage and Ceph RGW usually need true; AWS, B2 and Wasabi work with false.",
                    default=False,
                ),
                "credentials": _obj(
                    "s3: the access key, by reference. Without it the AWS default chain is used"
                    " (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of the service, ~/.aws, an EC2 instance"
                    " role).",
                    {
                        "access_key_id": _ref("secret", "The access key id (B2: the application key id)."),
                        "secret_access_key": _ref(
                            "secret", "The secret access key (B2: the application key)."
                        ),
                        "session_token": _ref("secret", "A session token, for temporary credentials."),
                    },
                    required=("access_key_id", "secret_access_key"),
                ),
                "tls": _obj(
                    "s3: how the endpoint's certificate is checked. Default: against the system's CAs.",
                    {
                        "ca_file": _str(
                            "A PEM file of the CA (or the self-signed certificate) to trust instead of the"
                            " system's: pins a private CA of your own MinIO/Garage/Ceph.",
                            ABSOLUTE_PATH_PATTERN,
                            examples=["/etc/esxi-reconciler/minio-ca.pem"],
                        ),
                        "insecure_skip_verify": _bool(
                            "Do not check the certificate at all (a loud warning; data stays encrypted when"
                            " encryption is enabled, but credentials can be stolen). Prefer ca_file.",
                            default=False,
                        ),
                    },
                    default={},
                ),
            },
            required=("type",),
            allOf=[
                _if(
                    {"properties": {"type": {"const": "local"}}, "required": ["type"]},
                    then={"required": ["path"]},
                ),
                _if(
                    {"properties": {"type": {"const": "s3"}}, "required": ["type"]},
                    then={"required": ["bucket"]},
                ),
            ],
        ),
        "id": _str(
            "The repository's id, as `repo init` prints it. When given, a path holding another repository"
            " (another volume mounted there, a repository created anew) is refused instead of used.",
            "^[0-9a-f]{32}$",
            examples=["5f0c3a9e1b7d4c2a8e6f0b1d3c5a7e9f"],
        ),
        "compression": _obj(
            "Compression of stored chunks.",
            {
                "algorithm": {
                    "type": "string",
                    "description": "zstd or none.",
                    "enum": ["zstd", "none"],
                    "default": "zstd",
                },
                "level": _int(
                    "zstd level, 1 (fast) to 19 (small). The default 1 is what Proxmox Backup Server uses:"
                    " on a 2-core NAS it compresses disk data several times faster than level 3 for a few"
                    " percent more space (bench/RESULTS.md).",
                    1,
                    19,
                    default=1,
                ),
            },
            default={},
        ),
        "encryption": _obj(
            "Encryption of stored data. Must be stated explicitly: it cannot be changed once the repository"
            " holds data.",
            {
                "enabled": _bool("Encrypt (authenticated encryption) everything stored."),
                "key": _ref(
                    "secret",
                    "The repository passphrase, by reference. Required when enabled. Lose"
                    " it and the backups are lost.",
                ),
            },
            required=("enabled",),
            **_if(
                {"properties": {"enabled": {"const": True}}, "required": ["enabled"]},
                then={"required": ["key"]},
            ),
        ),
        "prune": _obj(
            "Removal of restore points the retention no longer keeps. Opt-in.",
            {
                "enabled": _bool("Delete expired restore points and free their data.", default=False),
                "max_deletions_per_run": _int(
                    "Safety guard: a run that would delete more points than this deletes none and reports"
                    " it.",
                    1,
                    default=100,
                ),
            },
            default={},
        ),
    },
    required=("backend", "encryption"),
)

# -- BackupPolicy ------------------------------------------------------------------------------------

BACKUP_POLICY_SPEC = _obj(
    "Which VMs of a host are backed up, to which repository, when, and how long points are kept. A VM may"
    " be protected by several policies; each policy's points form their own retention group.",
    {
        "host": _ref("name", "Name of the Host the VMs run on."),
        "repository": _ref("name", "Name of the Repository that receives the restore points."),
        "vms": _obj(
            "The VMs, by display name (case-sensitive). At least one of names, patterns or all: true.",
            {
                "all": _bool("Every VM of the host.", default=False),
                "names": {
                    "type": "array",
                    "description": "Exact VM names.",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"type": "string", "description": "A VM name.", "minLength": 1},
                },
                "patterns": {
                    "type": "array",
                    "description": "Shell-style globs (*, ?, [abc]) matched against VM names.",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"type": "string", "description": "A glob.", "minLength": 1},
                },
                "exclude": {
                    "type": "array",
                    "description": "Globs of VM names left out even if selected above.",
                    "uniqueItems": True,
                    "default": [],
                    "items": {"type": "string", "description": "A glob.", "minLength": 1},
                },
            },
            anyOf=[
                {"required": ["names"]},
                {"required": ["patterns"]},
                {"properties": {"all": {"const": True}}, "required": ["all"]},
            ],
        ),
        "disks": _obj(
            "The disks of each VM. Each glob is matched against a disk's controller slot (scsi0:1), its label"
            " (Hard disk 2) and its file name (web01_1.vmdk).",
            {
                "include": {
                    "type": "array",
                    "description": "Disks backed up.",
                    "minItems": 1,
                    "default": ["*"],
                    "uniqueItems": True,
                    "items": {"type": "string", "description": "A glob.", "minLength": 1},
                },
                "exclude": {
                    "type": "array",
                    "description": "Disks left out, e.g. a scratch disk.",
                    "default": [],
                    "uniqueItems": True,
                    "items": {"type": "string", "description": "A glob.", "minLength": 1},
                },
            },
            default={},
        ),
        "schedule": _ref("schedule", "When backups run."),
        "retention": _ref("retention", "Which restore points are kept."),
        "cbt": {
            "type": "string",
            "description": "Changed Block Tracking desired on the VMs. enabled: the reconciler turns it on"
            " (incremental backups); disabled: turns it off; unmanaged: leaves it as it is.",
            "enum": ["enabled", "disabled", "unmanaged"],
            "default": "enabled",
        },
        "cbt_power_cycle": _obj(
            "On a free-licensed host CBT can only be switched while the VM is powered off. By default the"
            " change waits for the VM's next power-off; allowed: true lets the reconciler shut the guest down"
            " (VMware Tools), switch CBT and power it on again, inside the window.",
            {
                "allowed": _bool(
                    "Allow the reconciler to power-cycle running VMs to switch CBT.", default=False
                ),
                "window": _ref(
                    "window",
                    "Maintenance window for power cycles (schedule's time zone). Required when allowed.",
                ),
                "shutdown_timeout": _ref(
                    "duration",
                    "Time the guest gets to shut down before the attempt is"
                    " abandoned (the VM is left running).",
                    default="10m",
                ),
            },
            default={},
            **_if(
                {"properties": {"allowed": {"const": True}}, "required": ["allowed"]},
                then={"required": ["window"]},
            ),
        ),
        "quiesce": _bool(
            "Quiesce the guest file systems (VMware Tools; VSS on Windows) for the snapshot.", default=False
        ),
        "snapshot_timeout": _ref(
            "duration", "The backup fails if creating the snapshot takes longer.", default="30m"
        ),
        "hooks": _obj(
            "Commands run before and after each VM's backup.",
            {
                "pre": {
                    "type": "array",
                    "description": "Run in order before the snapshot.",
                    "default": [],
                    "items": _ref("hook", "A command."),
                },
                "post": {
                    "type": "array",
                    "description": "Run in order after the backup (also after a failed one).",
                    "default": [],
                    "items": _ref("hook", "A command."),
                },
            },
            default={},
        ),
        "suspend": _bool(
            "Pause the policy: nothing is scheduled, CBT is not changed, nothing is pruned.", default=False
        ),
        "rpo": _ref(
            "duration",
            "Recovery-point objective: `esxi-reconciler status` fails when a VM of this policy has no"
            " successful backup this recent. Default: twice the longest interval between two scheduled runs"
            " (one missed run is tolerated); a manual, once or after schedule has none unless it is given.",
        ),
    },
    required=("host", "repository", "vms", "schedule", "retention"),
)

# -- VerifyPolicy ------------------------------------------------------------------------------------

VERIFY_POLICY_SPEC = _obj(
    "A regular check that a repository's restore points can be read back.",
    {
        "repository": _ref("name", "Name of the Repository to verify."),
        "schedule": _ref("schedule", "When the verification runs."),
        "read_data_percent": {
            "type": "number",
            "description": "Share of stored data read back and authenticated on each run; 0 checks only that"
            " indexes are sound and chunks exist.",
            "minimum": 0,
            "maximum": 100,
            "default": 100,
        },
        "suspend": _bool("Pause the policy.", default=False),
        "test_restore": _obj(
            "Also prove that VMs boot: restore each VM's newest point as a temporary VM on this host,"
            " power it on, wait for poweredOn (and a green guest heartbeat where reported), then remove"
            " it. The result is a status condition.",
            {
                "host": _ref("name", "Name of the Host where the temporary VMs run."),
                "datastore": _str(
                    "Datastore of that host for the temporary VMs; default: the VM's original datastore.",
                    minLength=1,
                ),
                "vms": {
                    "type": "array",
                    "description": "Names of the VMs to test; default: every VM with points in the"
                    " repository.",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"type": "string", "description": "A VM name.", "minLength": 1},
                },
            },
            required=("host",),
        ),
    },
    required=("repository", "schedule"),
)

# -- CopyPolicy --------------------------------------------------------------------------------------

COPY_POLICY_SPEC = _obj(
    "An off-site copy: restore points copied on a schedule from one repository to another (local to S3, S3"
    " to local, between two buckets), like Proxmox Backup Server's sync jobs. Only chunks the destination"
    " lacks are sent; chunks are re-encrypted when the keys differ; every copied point is checked in the"
    " destination; an interrupted copy resumes. The destination keeps copies by this policy's retention.",
    {
        "source": _ref("name", "Name of the Repository copied from."),
        "destination": _ref("name", "Name of the Repository copied to (e.g. one on S3)."),
        "schedule": _ref(
            "schedule",
            "When the copy runs. after: POLICY copies right after that BackupPolicy's backups succeeded.",
        ),
        "vms": {
            "type": "array",
            "description": "Globs of VM names whose points are copied. Default: every VM.",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "description": "A glob.", "minLength": 1},
        },
        "policies": {
            "type": "array",
            "description": "Names of the BackupPolicies whose points are copied. Default: every policy.",
            "minItems": 1,
            "uniqueItems": True,
            "items": _ref("name", "A BackupPolicy name."),
        },
        "max_age": _ref(
            "duration",
            "Copy only points younger than this (a first copy of a long history need not send all of it)."
            " Default: every point the source has.",
        ),
        "retention": _ref(
            "retention",
            "Which copies the destination keeps, per (backup policy, VM); pruned there by the daemon when the"
            " destination's prune.enabled is true (within its max_deletions_per_run). A point this retention"
            " would not keep is not copied, so a pruned copy is not sent again. A BackupPolicy writing to the"
            " destination itself keeps its own retention there.",
        ),
        "suspend": _bool("Pause the policy: no copy, no pruning of the copies.", default=False),
    },
    required=("source", "destination", "schedule", "retention"),
)

# -- Notifier ----------------------------------------------------------------------------------------

NOTIFIER_SPEC = _obj(
    "Where the daemon tells its owner, without being asked, that something needs attention: e-mail,"
    " ntfy, Gotify, Slack, Discord, Teams, Telegram, Pushover, a JSON webhook or any other service apprise"
    " speaks. One message per change (a backup fails, it recovers), never one per cycle; optionally a"
    " daily or weekly summary.",
    {
        "url": _str(
            "The service, as an apprise URL (https://github.com/caronc/apprise/wiki). Write {NAME} where a"
            " secret goes (a password, a token) and give it under secrets: the URL itself must not hold"
            " one. E-mail: mailtos:// (STARTTLS, port 587; add &mode=ssl for TLS from the start, port"
            " 465) or mailto:// (plain SMTP, for a relay on the local network), with ?to=, ?from= and"
            " ?smtp=.",
            NOTIFY_URL_PATTERN,
            minLength=1,
            examples=[
                "mailtos://backup:{password}@smtp.example.com:587?to=ops@example.com",
                "ntfys://ntfy.example.com/esxi-backups",
                "gotifys://gotify.example.com/{token}",
            ],
        ),
        "secrets": {
            "type": "object",
            "description": "The secrets the URL refers to: placeholder name → secret reference. Each value"
            " is read when a message is sent, URL-encoded into the URL, and never logged or recorded.",
            "propertyNames": {"pattern": PLACEHOLDER_NAME_PATTERN},
            "additionalProperties": _ref("secret", "A secret reference."),
            "default": {},
        },
        "events": {
            "type": "array",
            "description": "What is sent. backup-failed: a VM's backup failed or cannot run (its host,"
            " repository or VM is unreachable or missing); recovered: such a problem is gone (for every"
            " event below that is a state); stale: a VM has no successful backup within its policy's RPO;"
            " low-space: a datastore below its host's free-space floor, or a repository volume below"
            " repository_min_free; cbt-pending: a CBT change has waited longer than cbt_pending_after;"
            " verify-damage: a verification found problems; test-restore-failed: a test restore did not"
            " boot; config-invalid: the config was rejected (also at start-up); error: anything else"
            " Stalled (a prune or GC failed, a snapshot could not be removed).",
            "items": {"type": "string", "description": "An event.", "enum": list(NOTIFY_EVENTS)},
            "uniqueItems": True,
            "default": list(NOTIFY_EVENTS),
        },
        "summary": _ref(
            "schedule",
            "Also send a summary on this schedule: what is protected, what ran since the last summary, what"
            " needs attention. Usually daily or weekly with a timezone.",
            examples=[{"daily": {"at": "08:00"}, "timezone": "Europe/Berlin"}],
        ),
        "rate_limit": _obj(
            "At most this many messages per period; what happens meanwhile is sent together, in one message,"
            " once the period allows.",
            {
                "messages": _int("Messages per period.", 1, default=10),
                "per": _ref("duration", "The period.", default="1h"),
            },
            default={},
        ),
        "cbt_pending_after": _ref(
            "duration",
            "A CBT change still pending after this long is reported (cbt-pending): on a free host it waits"
            " for the VM's power-off, which may never come.",
            default="24h",
        ),
        "repository_min_free": _obj(
            "A repository volume with less free space than either threshold is reported (low-space).",
            {
                "size": _ref("size", "Minimum free space, e.g. 100GiB.", default=0),
                "percent": {
                    "type": "number",
                    "description": "Free space floor as a percentage of the volume.",
                    "minimum": 0,
                    "maximum": 100,
                    "default": 10,
                },
            },
            default={},
        ),
        "suspend": _bool("Send nothing (the history still records what would have been).", default=False),
    },
    required=("url",),
)

# -- Monitoring --------------------------------------------------------------------------------------

MONITORING_SPEC = _obj(
    "How the daemon can be watched (at most one Monitoring document): an HTTP listener serving Prometheus"
    " metrics, /healthz and /readyz for service managers, a read-only status page and the git webhook;"
    " and/or a Prometheus text file rewritten after every cycle for node_exporter's textfile collector.",
    {
        "listen": _obj(
            "The HTTP(S) listener of `esxi-reconciler run`. On a loopback address (the default) it needs no"
            " token; bound to any other address it must have one. /healthz and /readyz never ask for it;"
            " every other page does when a token is set. The git webhook always needs it.",
            {
                "address": _str(
                    "Address to bind. 0.0.0.0 or :: listen on every interface.",
                    LISTEN_ADDRESS_PATTERN,
                    default="127.0.0.1",
                    examples=["127.0.0.1", "0.0.0.0", "192.168.1.20"],  # noqa: S104 - documentation
                ),
                "port": _int("TCP port.", 1, 65535, default=9137),
                "token": _ref(
                    "secret",
                    "The access token, by reference. Clients send it as `Authorization: Bearer TOKEN`, or as"
                    " the password of HTTP basic authentication (any user name: what a browser asks for);"
                    " git forges as the webhook secret (X-Gitlab-Token, or the HMAC signature"
                    " X-Hub-Signature-256 of GitHub, Gitea and Forgejo). Read on every request, so it can be"
                    " rotated without a restart.",
                ),
                "tls": _obj(
                    "Serve HTTPS with this certificate and key (PEM files, read when the listener starts).",
                    {
                        "cert_file": _str(
                            "Absolute path of the certificate chain (PEM).", ABSOLUTE_PATH_PATTERN
                        ),
                        "key_file": _str(
                            "Absolute path of the private key (PEM, unencrypted; chmod 600).",
                            ABSOLUTE_PATH_PATTERN,
                        ),
                    },
                    required=("cert_file", "key_file"),
                ),
            },
            default={},
        ),
        "textfile": _str(
            "Also write the metrics to this file after every cycle (atomically: a temporary file renamed),"
            " for node_exporter's textfile collector (--collector.textfile.directory). The name must end"
            " in .prom.",
            PROM_FILE_PATTERN,
            examples=["/var/lib/node_exporter/textfile_collector/esxi_reconciler.prom"],
        ),
        "ready_after": _ref(
            "duration",
            "/readyz answers 503 when no cycle is running and the last one finished longer ago than this"
            " (or none has, or no valid config is loaded).",
            default="30m",
        ),
    },
)

# -- GitSource: the bootstrap file of `run --source` -------------------------------------------------

GIT_SOURCE_SPEC = _obj(
    "Where the daemon fetches its config from: a branch or tag of a git repository, fetched on an interval"
    " over SSH with a deploy key and a pinned host key, or over HTTPS with an access token, optionally"
    " trusting only commits signed by listed"
    " keys. Lives in a small bootstrap file given to `esxi-reconciler run --source FILE`, never in the"
    " config directory it fetches: a commit must not be able to change where the config comes from or whose"
    " signatures are trusted.",
    {
        "url": _str(
            "The repository's URL: ssh://USER@HOST[:PORT]/PATH, USER@HOST:PATH (scp-like),"
            " https://HOST[:PORT]/PATH, or file:///PATH for a repository on this machine. Plain http:// and"
            " credentials inside the URL are refused: give them in spec.https.",
            GIT_URL_PATTERN,
            examples=[
                "ssh://git@git.example.com/infra/esxi-config.git",
                "https://github.com/example/esxi-config.git",
                "file:///srv/git/esxi-config.git",
            ],
        ),
        "branch": _str(
            "The branch to follow (its head is applied). Give branch or tag.", minLength=1, examples=["main"]
        ),
        "tag": _str("A tag to apply instead of a branch (moving the tag moves the config).", minLength=1),
        "path": _str(
            "Sub-directory of the repository holding the config. Default: the top directory.",
            RELATIVE_PATH_PATTERN,
            default="",
            examples=["esxi", "clusters/nas1"],
        ),
        "interval": _ref("duration", "How often the remote is fetched (also on SIGHUP).", default="1m"),
        "timeout": _ref(
            "duration", "Longest time one git command (a fetch) may take before it is killed.", default="2m"
        ),
        "ssh": _obj(
            "How the SSH remote is reached. Required for SSH URLs.",
            {
                "private_key": _ref(
                    "secret",
                    "The deploy key (an OpenSSH private key without passphrase; read-only access to the"
                    " repository is enough), by reference.",
                ),
                "host_keys": {
                    "type": "array",
                    "description": "The server's public host key(s), pinned: the connection is refused if it"
                    " presents another. As printed by ssh-keyscan HOST (without the host name); compare"
                    " their fingerprints (ssh-keygen -lf) with what the server's admin publishes.",
                    "items": _str("One public host key: TYPE BASE64.", SSH_PUBLIC_KEY_PATTERN),
                    "minItems": 1,
                },
            },
            required=("private_key", "host_keys"),
        ),
        "https": _obj(
            "How the HTTPS remote is reached. Optional for a public repository whose certificate the"
            " system trusts. The token is sent as HTTP Basic authentication by a credential helper that"
            " reads it from a private file while a fetch runs: it is never on a command line, in the"
            " clone's git config, a log or the status. The server's certificate is always verified.",
            {
                "username": _str(
                    "The user the token belongs to (GitHub: any non-empty name such as x-access-token;"
                    " GitLab deploy token: its username; Gitea: the account's name).",
                    minLength=1,
                    examples=["x-access-token", "gitlab+deploy-token-7"],
                ),
                "token": _ref(
                    "secret",
                    "The access token (read-only access to the repository is enough), by reference.",
                ),
                "ca_file": _str(
                    "A PEM file with the CA certificate(s) that sign the server's certificate, trusted"
                    " instead of the system's CA store (for a forge with a private CA).",
                    ABSOLUTE_PATH_PATTERN,
                    examples=["/etc/esxi-reconciler/git-ca.pem"],
                ),
            },
            dependentRequired={"username": ["token"], "token": ["username"]},
        ),
        "verify": _obj(
            "Apply only commits signed by one of these keys (checked with git verify-commit). An unsigned or"
            " wrongly signed head is reported and the last trusted revision stays in force. Without it,"
            " every fetched commit is applied.",
            {
                "signers": {
                    "type": "array",
                    "description": "The trusted keys: SSH keys (git's gpg.format ssh) and/or OpenPGP keys.",
                    "minItems": 1,
                    "items": _ref("signer", "A trusted key."),
                },
            },
            required=("signers",),
        ),
        "allow_rollback": _bool(
            "Apply a head that is older than the applied revision (an ancestor of it, or committed before"
            " it). Off by default, so a force-push to an old commit cannot silently roll the config back.",
            default=False,
        ),
    },
    required=("url",),
    oneOf=_one_key_of(("branch", "tag")),
)

_SPECS: dict[str, tuple[str, Schema]] = {
    "Host": ("host", HOST_SPEC),
    "Repository": ("repository", REPOSITORY_SPEC),
    "BackupPolicy": ("backup-policy", BACKUP_POLICY_SPEC),
    "VerifyPolicy": ("verify-policy", VERIFY_POLICY_SPEC),
    "CopyPolicy": ("copy-policy", COPY_POLICY_SPEC),
    "Notifier": ("notifier", NOTIFIER_SPEC),
    "Monitoring": ("monitoring", MONITORING_SPEC),
    SOURCE_KIND: ("git-source", GIT_SOURCE_SPEC),
}


def _used_defs(schema: Any, found: set[str]) -> set[str]:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name not in found:
                found.add(name)
                _used_defs(DEFS[name], found)
        for value in schema.values():
            _used_defs(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _used_defs(value, found)
    return found


def file_name(kind: str) -> str:
    """The file of a kind's schema in ``schemas/``, e.g. ``backup-policy.schema.json``."""
    return f"{_SPECS[kind][0]}.schema.json"


def kind_schema(kind: str) -> Schema:
    """The complete, self-contained schema of one kind (a fresh copy)."""
    slug, spec = _SPECS[kind]
    schema: Schema = {"$schema": SCHEMA_URI, "$id": f"{ID_PREFIX}{slug}", "title": kind}
    schema.update(_envelope(kind, spec["description"], spec))
    defs = sorted(_used_defs(schema, set()))
    schema["$defs"] = {name: DEFS[name] for name in defs}
    return copy.deepcopy(schema)


def envelope_schema() -> Schema:
    """The schema checked when a document's kind is missing or unknown."""
    return {
        "$schema": SCHEMA_URI,
        "$id": f"{ID_PREFIX}document",
        "type": "object",
        "description": "A desired-state document.",
        "properties": {
            "apiVersion": {"const": API_VERSION, "description": f"Always {API_VERSION}."},
            "kind": {"type": "string", "enum": list(KINDS), "description": "The kind of object."},
            "metadata": {"type": "object", "description": "Identity of the object."},
            "spec": {"type": "object", "description": "The desired state."},
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
    }


def combined_schema() -> Schema:
    """One schema accepting a document of any kind (for editors on files that mix kinds)."""
    defs: dict[str, Schema] = {}
    branches: list[Schema] = []
    for kind in KINDS:
        schema = kind_schema(kind)
        defs.update(schema.pop("$defs"))
        for key in ("$schema", "$id", "title"):
            schema.pop(key)
        defs[kind] = schema
        branches.append(
            {
                "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                "then": {"$ref": f"#/$defs/{kind}"},
            }
        )
    return {
        "$schema": SCHEMA_URI,
        "$id": f"{ID_PREFIX}any",
        "title": "esxi-reconciler desired state",
        "description": "Any esxi-reconciler document; the kind field selects the schema.",
        "type": "object",
        "properties": {"kind": {"type": "string", "enum": list(KINDS), "description": "The kind of object."}},
        "required": ["kind"],
        "allOf": branches,
        "$defs": dict(sorted(defs.items())),
    }


def rendered() -> dict[str, str]:
    """Every schema file's name and exact content, as written to ``schemas/``."""
    files = {file_name(kind): kind_schema(kind) for kind in (*KINDS, SOURCE_KIND)}
    files["esxi-reconciler.schema.json"] = combined_schema()
    return {name: json.dumps(schema, indent=2, ensure_ascii=False) + "\n" for name, schema in files.items()}
