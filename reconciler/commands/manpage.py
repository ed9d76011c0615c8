"""The man page ``esxi-reconciler(1)``, written from the argument parser (``esxi-reconciler _manpage``,
run by ``make install``), so it says what ``--help`` says.

Our own small writer rather than argparse-manpage: for this parser that library repeats the five global
options under each of the ~30 commands (every verb inherits them to accept them after its name), lists
commands kept out of ``--help`` (``repo key-export``) and drops each command's examples and exit
status (the epilogs). Here the global options are listed once, a command without ``help`` is left out
as in ``--help``, and the epilogs are kept.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

from reconciler.commands.common import DEFAULT_STATE_DIR, EXIT_CODES_HELP, STATE_ENV
from reconciler.config.loader import CONFIG_ENV, DEFAULT_CONFIG_DIR

_HEADER = re.compile(r"^([a-z][a-z ]*):$")
"""A line that heads a block of an epilog: ``examples:``, ``environment:``."""


def roff(text: str) -> str:
    """``text`` as roff: backslashes, hyphens and non-ASCII characters escaped, and no line starting
    with a control character."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\e")
        elif char == "-":
            out.append("\\-")
        elif ord(char) > 126:
            out.append(f"\\[u{ord(char):04X}]")
        else:
            out.append(char)
    escaped = "".join(out)
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in escaped.split("\n"))


def _filled(text: str) -> str:
    """A paragraph of text whose line breaks are not meaningful."""
    return roff(" ".join(line.strip() for line in text.strip().splitlines()))


def _blocks(text: str) -> Iterator[tuple[str | None, list[str]]]:
    """The blank-line separated blocks of an epilog: ``(header, lines)``, header None for prose."""
    block: list[str] = []
    for line in [*text.rstrip().splitlines(), ""]:
        if line.strip():
            block.append(line)
            continue
        if block:
            match = _HEADER.match(block[0])
            yield (match.group(1), block[1:]) if match else (None, block)
        block = []


def _epilog(text: str | None) -> list[str]:
    """A command's epilog; the exit codes every command shares are said once, under EXIT STATUS."""
    lines: list[str] = []
    for header, block in _blocks((text or "").replace(EXIT_CODES_HELP, "")):
        if header is None:
            lines += [".PP", _filled("\n".join(block))]
        else:
            lines += [".PP", f"\\fB{roff(header.capitalize())}:\\fR", ".nf", roff("\n".join(block)), ".fi"]
    return lines


def _option_name(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} \\fI{roff(_metavar(action))}\\fR"


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper()


def _positional(action: argparse.Action) -> str:
    name = f"\\fI{roff(_metavar(action))}\\fR"
    return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} [{name} ...]"}.get(str(action.nargs), name)


def _synopsis(prog: str, parser: argparse.ArgumentParser, global_dests: set[str]) -> str:
    parts = [f"\\fB{roff(prog)}\\fR"]
    for action in _own_actions(parser, global_dests):
        if isinstance(action, argparse._SubParsersAction):
            parts.append("\\fISUBCOMMAND\\fR" if action.required else "[\\fISUBCOMMAND\\fR]")
        elif action.option_strings:
            option = _option_name(action).split(", ")[0] if action.nargs == 0 else _short(action)
            parts.append(option if action.required else f"[{option}]")
        else:
            parts.append(_positional(action))
    return " ".join(parts)


def _short(action: argparse.Action) -> str:
    return f"\\fB{roff(action.option_strings[0])}\\fR \\fI{roff(_metavar(action))}\\fR"


def _own_actions(parser: argparse.ArgumentParser, global_dests: set[str]) -> list[argparse.Action]:
    """The arguments of a command, without the global options and ``--help``."""
    return [
        a
        for a in parser._actions
        if a.dest not in global_dests
        and not isinstance(a, argparse._HelpAction)
        and a.help != argparse.SUPPRESS
    ]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """The listed sub-commands of ``parser``: name, one-line help and parser (unlisted ones, which
    have no help, are left out as ``--help`` leaves them out)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                found.append((choice.dest, str(choice.help or ""), action.choices[choice.dest]))
    return found


def _command(
    prog: str, help: str, parser: argparse.ArgumentParser, global_dests: set[str], seen: set[str]
) -> list[str]:
    lines = [
        f".SS {roff(prog)}",
        _synopsis(prog, parser, global_dests),
        ".PP",
        _filled(parser.description or help),
    ]
    options = [a for a in _own_actions(parser, global_dests) if not isinstance(a, argparse._SubParsersAction)]
    for action in options:
        term = _option_name(action) if action.option_strings else f"\\fI{roff(_metavar(action))}\\fR"
        lines += [".TP", term, _filled(str(action.help or ""))]
    subcommands = _subcommands(parser)
    if subcommands:
        lines += [
            ".PP",
            "Subcommands: " + ", ".join(f"\\fB{roff(name)}\\fR" for name, _, _ in subcommands) + ".",
        ]
    if parser.epilog and parser.epilog not in seen:  # several subcommands share their parent's examples
        seen.add(parser.epilog)
        lines += _epilog(parser.epilog)
    for name, sub_help, sub in subcommands:
        lines += _command(f"{prog} {name}", sub_help, sub, global_dests, seen)
    return lines


def manpage(root: argparse.ArgumentParser, version: str) -> str:
    """The complete man page (section 1) of the program whose parser is ``root``."""
    prog = root.prog
    group = next(g for g in root._action_groups if g.title == "global options")
    global_dests = {a.dest for a in group._group_actions}
    description = (root.description or "").rstrip(".")
    epilog = list(_blocks((root.epilog or "").replace(EXIT_CODES_HELP, "")))
    lines = [
        f'.TH {roff(prog.upper())} 1 "" "{roff(prog)} {roff(version)}" "User Commands"',
        ".SH NAME",
        f"{roff(prog)} \\- {roff(description[:1].lower() + description[1:])}",
        ".SH SYNOPSIS",
        f"\\fB{roff(prog)}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]"
        " [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
        _filled(root.description or ""),
        *(line for header, block in epilog if header is None for line in (".PP", _filled("\n".join(block)))),
        ".PP",
        f"\\fB{roff(prog)} \\fICOMMAND\\fB \\-\\-help\\fR shows the options and examples of one command,"
        " as below.",
        ".SH GLOBAL OPTIONS",
        "Accepted before or after the command.",
    ]
    for action in root._actions:
        if action.dest in global_dests or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            lines += [".TP", _option_name(action), _filled(str(action.help or ""))]
    lines.append(".SH COMMANDS")
    seen = {root.epilog or ""}
    for name, help, sub in _subcommands(root):
        lines += _command(f"{prog} {name}", help, sub, global_dests, seen)
    for header, block in epilog:
        if header is not None:
            lines += [f".SH {roff(header.upper())}", ".nf", roff("\n".join(block)), ".fi"]
    lines += [
        ".SH EXIT STATUS",
        _filled(EXIT_CODES_HELP.split(":", 1)[1]),
        ".PP",
        "Each command's own meanings are listed with it above; with \\fB\\-\\-json\\fR an expected failure"
        " is also printed as a JSON error object on stdout.",
        ".SH FILES",
        ".TP",
        f"\\fI{roff(str(DEFAULT_CONFIG_DIR))}\\fR",
        f"The config directory when neither \\fB\\-\\-config\\fR nor \\fB${roff(CONFIG_ENV)}\\fR is given.",
        ".TP",
        f"\\fI{roff(str(DEFAULT_STATE_DIR))}/status.db\\fR",
        f"The status store (run history, conditions, action log) when neither \\fB\\-\\-state\\-dir\\fR nor"
        f" \\fB${roff(STATE_ENV)}\\fR is given.",
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBsystemd.exec\\fR(5)",
    ]
    return "\n".join(lines) + "\n"
