"""``esxi-reconciler schema KIND|--list``: the JSON Schema of a config kind, as shipped in the package.

The files are package data (``reconciler/schemas/``, generated from :mod:`reconciler.config.schemas`;
a test keeps them equal), so an installed program has them without a source checkout: ``--path``
gives the file for an editor's ``yaml-language-server`` modeline.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from typing import TYPE_CHECKING

from reconciler.commands.common import ExitCode, add_command, emit_json, fail

if TYPE_CHECKING:
    from importlib.abc import Traversable  # importlib.resources.abc from Python 3.11 on

_EXAMPLES = """\
examples:
  esxi-reconciler schema host               the JSON Schema of a Host document
  esxi-reconciler schema --list             every kind, its schema file and where it is installed
  esxi-reconciler schema all --path         the file that accepts any kind, for an editor:
      # yaml-language-server: $schema=/usr/lib/esxi-reconciler/reconciler/schemas/esxi-reconciler.schema.json
  esxi-reconciler schema backup-policy > backup-policy.schema.json

`make install` also puts the files in /usr/share/esxi-reconciler/schemas/.

Exit 1 when the schema files are missing from the installation.
"""

KINDS = {
    "host": ("Host", "host.schema.json"),
    "repository": ("Repository", "repository.schema.json"),
    "backup-policy": ("BackupPolicy", "backup-policy.schema.json"),
    "verify-policy": ("VerifyPolicy", "verify-policy.schema.json"),
    "copy-policy": ("CopyPolicy", "copy-policy.schema.json"),
    "git-source": ("GitSource", "git-source.schema.json"),
    "notifier": ("Notifier", "notifier.schema.json"),
    "monitoring": ("Monitoring", "monitoring.schema.json"),
    "all": ("any kind", "esxi-reconciler.schema.json"),
}
"""The names ``schema`` accepts (also as the kind is spelled in a document: ``BackupPolicy``)."""


def _kind(text: str) -> str:
    """``BackupPolicy``, ``backuppolicy`` or ``backup-policy`` → ``backup-policy``."""
    wanted = text.replace("-", "").replace("_", "").lower()
    for name, (kind, _) in KINDS.items():
        if wanted in (name.replace("-", ""), kind.lower()):
            return name
    return text


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "schema",
        help="print the JSON Schema of a config kind (for editors)",
        description="Print the JSON Schema (draft 2020-12) of the documents of KIND, the one editors use"
        " to complete and check config files, or with --path where its file is installed.",
        epilog=_EXAMPLES,
        handler=cmd_schema,
    )
    parser.add_argument(
        "kind",
        metavar="KIND",
        nargs="?",
        type=_kind,
        choices=tuple(KINDS),
        help="host, repository, backup-policy, verify-policy, copy-policy, notifier, git-source (the"
        " bootstrap file"
        " of run --source), or all (any kind of the config)",
    )
    parser.add_argument("--list", action="store_true", help="list the kinds and their schema files")
    parser.add_argument("--path", action="store_true", help="print the path of the file instead")


def schema_file(name: str) -> Traversable:
    """The packaged schema file of the kind ``name`` (a key of :data:`KINDS`)."""
    return files("reconciler") / "schemas" / KINDS[name][1]


def cmd_schema(args: argparse.Namespace) -> int:
    """``schema KIND [--path]`` or ``schema --list``: 0, 1 the files are missing, 64 usage error."""
    if args.list == (args.kind is not None):
        fail("give a KIND or --list (see schema --help)", "usage", "usage")
    names = list(KINDS) if args.list else [args.kind]
    missing = [KINDS[n][1] for n in names if not schema_file(n).is_file()]
    if missing:
        fail(
            f"{', '.join(missing)} missing from the installed package ({files('reconciler') / 'schemas'});"
            " reinstall esxi-reconciler",
            "not-installed",
        )
    rows = [{"name": n, "kind": KINDS[n][0], "file": KINDS[n][1], "path": str(schema_file(n))} for n in names]
    if args.list or args.path:
        if args.json:
            emit_json({"ok": True, "schemas": rows})
        elif args.list:
            width = max(len(n) for n in names)
            for row in rows:
                print(f"{row['name']:<{width}}  {row['path']}")
        else:
            print(rows[0]["path"])
    else:  # the schema itself is the JSON document, with or without --json
        sys.stdout.write(schema_file(args.kind).read_text(encoding="utf-8"))
    return ExitCode.OK
