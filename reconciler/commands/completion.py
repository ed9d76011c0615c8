"""``esxi-reconciler completion bash|zsh``: the shell completion script, generated from the parser with
shtab; ``esxi-reconciler _complete vms|points|repositories|policies|hosts|notifiers`` (not listed): the
names the script offers for VMs, restore points and config objects; ``esxi-reconciler _manpage`` (not listed):
the man page, from the same parser (:mod:`reconciler.commands.manpage`).

shtab over argcomplete: shtab writes a static script once (``make install`` puts it in place), so a
TAB costs no Python start-up except where a name must be looked up (``_complete``); argcomplete runs
the whole program on every TAB and needs a hook in the entry point.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from reconciler.commands.common import ExitCode, add_command, emit_json, load_desired

if TYPE_CHECKING:
    from reconciler.config.model import DesiredState

SHELLS = ("bash", "zsh")
NAME_KINDS = ("vms", "points", "repositories", "policies", "hosts", "notifiers")

_EXAMPLES = """\
examples:
  esxi-reconciler completion bash > ~/.local/share/bash-completion/completions/esxi-reconciler
  esxi-reconciler completion zsh > ~/.zfunc/_esxi-reconciler   (a directory in $fpath)

`make install` installs both for every user. Besides commands and options they complete VM
names, restore point ids and the names of repositories, policies, hosts and notifiers, read from the
config (--config on the command line, else the default) and its repositories.
"""

# Which names an argument takes, by its dest: looked up by `_complete`, or files and directories.
_NAMES_BY_DEST = {
    "vm": "vms",
    "to_vm": "vms",
    "point": "points",
    "point_ids": "points",
    "repository": "repositories",
    "repositories": "repositories",
    "policy": "policies",
    "host": "hosts",
    "from_host": "hosts",
    "notifier": "notifiers",
}
_FILES_BY_DEST = {"config", "out", "file", "planfile", "passphrase_file", "new_passphrase_file"}
_DIRECTORIES_BY_DEST = {"state_dir", "to", "dir"}

_BASH_PREAMBLE = """\
# The names of VMs, restore points, repositories, policies, hosts or notifiers ($1), read by the program
# itself from the config given with --config (else its default); nothing when that fails.
_esxi_reconciler_names() {
  local i config=()
  for ((i = 1; i < COMP_CWORD; i++)); do
    case ${COMP_WORDS[i]} in
      --config) config=(--config "${COMP_WORDS[i+1]}") ;;
      --config=*) config=("${COMP_WORDS[i]}") ;;
    esac
  done
  local IFS=$'\\n'
  compgen -W "$("${COMP_WORDS[0]}" "${config[@]}" _complete "$1" 2>/dev/null)" -- "$2"
}
""" + "".join(f'_esxi_reconciler_{kind}() {{ _esxi_reconciler_names {kind} "$1"; }}\n' for kind in NAME_KINDS)

_ZSH_PREAMBLE = """\
# The names of VMs, restore points, repositories, policies, hosts or notifiers ($1), read by the program
# itself from the config given with --config (else its default); nothing when that fails.
# (The whole command line: $words holds only a subcommand's words.)
_esxi_reconciler_names() {
  local -a line config names
  line=("${(@Q)${(z)BUFFER}}")
  local i=${line[(I)--config]}
  (( i > 0 )) && config=(--config "${line[i+1]}")
  names=("${(@f)$("${line[1]}" "${config[@]}" _complete "$1" 2>/dev/null)}")
  compadd -a names
}
""" + "".join(f"_esxi_reconciler_{kind}() {{ _esxi_reconciler_names {kind} }}\n" for kind in NAME_KINDS)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        commands,
        "completion",
        help="print the bash or zsh completion script",
        description="Print the completion script for SHELL, generated from this program's own options.",
        epilog=_EXAMPLES,
        handler=cmd_completion,
    )
    parser.add_argument("shell", metavar="SHELL", choices=SHELLS, help="bash or zsh")
    names = add_command(
        commands,
        "_complete",
        help=None,
        description="Print the names the completion scripts offer, one per line (for the scripts).",
        epilog="",
        handler=cmd_complete,
    )
    names.add_argument("kind", choices=NAME_KINDS)
    add_command(
        commands,
        "_manpage",
        help=None,
        description="Print the man page (roff), generated from this program's own options.",
        epilog="",
        handler=cmd_manpage,
    )


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-command's parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found.extend(_parsers(sub))
    return found


def _mark_completions(root: argparse.ArgumentParser) -> None:
    """Tell shtab, per argument, what it takes: names (looked up by `_complete`), files or
    directories."""
    import shtab

    for parser in _parsers(root):
        for action in parser._actions:
            complete: Any = None
            if action.dest in _NAMES_BY_DEST:
                kind = _NAMES_BY_DEST[action.dest]
                complete = {"bash": f"_esxi_reconciler_{kind}", "zsh": f"_esxi_reconciler_{kind}"}
            elif action.dest in _FILES_BY_DEST:
                complete = shtab.FILE
            elif action.dest in _DIRECTORIES_BY_DEST:
                complete = shtab.DIRECTORY
            if complete is not None:
                action.complete = complete  # type: ignore[attr-defined]


def completion_script(root: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh) of the parser ``root``."""
    import shtab

    _mark_completions(root)
    preamble = _BASH_PREAMBLE if shell == "bash" else _ZSH_PREAMBLE
    return shtab.complete(root, shell=shell, preamble=preamble)


def cmd_completion(args: argparse.Namespace) -> int:
    """``completion bash|zsh``: 0."""
    script = completion_script(args.root_parser, args.shell)
    if args.json:
        emit_json({"ok": True, "shell": args.shell, "script": script})
    else:
        sys.stdout.write(script)
    return ExitCode.OK


def cmd_manpage(args: argparse.Namespace) -> int:
    """``_manpage``: 0."""
    from reconciler import __version__
    from reconciler.commands.manpage import manpage

    sys.stdout.write(manpage(args.root_parser, __version__))
    return ExitCode.OK


def cmd_complete(args: argparse.Namespace) -> int:
    """``_complete KIND``: the names, one per line; 1 (and nothing printed) when the config or a
    repository cannot be read. Never asks anything and logs nothing: a completion script runs it."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            desired = load_desired(args)
        except Exception:  # noqa: BLE001  a missing or invalid config: nothing to offer, nothing to say
            return ExitCode.FAILED
        names: set[str] = set()
        if args.kind == "repositories":
            names.update(desired.repositories)
        elif args.kind == "policies":
            names.update(desired.policies)
        elif args.kind == "hosts":
            names.update(desired.hosts)
        elif args.kind == "notifiers":
            names.update(desired.notifiers)
        else:
            if args.kind == "vms":
                for policy in desired.policies.values():
                    names.update(policy.vms.names)
            names.update(_from_points(desired, args.kind))
    for name in sorted(names):
        if "\n" not in name:
            print(name)
    return ExitCode.OK


def _from_points(desired: DesiredState, kind: str) -> set[str]:
    """VM names or point ids of every repository that opens (under a shared lock, like `points`)."""
    from reconciler.operations.repositories import open_repository

    found: set[str] = set()
    for cfg in desired.repositories.values():
        try:
            repo = open_repository(cfg)
            with repo.lock(purpose="complete names"):
                if kind == "points":
                    found.update(repo.point_ids())
                else:
                    found.update(p.vm.name for p in repo.list_points())
        except Exception:  # noqa: S112, BLE001  completion offers what it can read; the rest stays silent
            continue
    return found
