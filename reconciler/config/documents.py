"""Reading YAML desired-state files into plain data that remembers where every value came from.

PyYAML's own loaders read YAML 1.1, which silently turns ``yes``/``on`` into ``True``, ``012`` into 10,
``02:00`` into 120 and ``2026-01-01`` into a date, and keeps the last of two duplicate keys. This
module composes the node tree with PyYAML's parser but resolves plain scalars itself, with a small
YAML-1.2-core-like set of rules:

- ``null``/``Null``/``NULL``/``~``/empty → ``None``; ``true``/``false`` (three spellings) → bool;
- ``0`` or a decimal integer without leading zeros → int; a decimal number with a point or an
  exponent → float;
- everything else (``yes``, ``off``, ``012``, ``0x1F``, ``1_000``, ``02:00``, ``2026-01-01``, ``.inf``)
  stays the string that was written.

Before any of that, a file holding git's conflict markers (``<<<<<<< HEAD`` … ``=======`` …
``>>>>>>> branch``, left by a failed merge) is reported as one issue at its first marker: YAML would
read the markers as text, or fail on the line after them.

It also refuses what has no place in a reviewed config: anchors and aliases (no "billion laughs"),
explicit tags other than ``!!str``, duplicate or non-scalar keys, nesting deeper than
:data:`MAX_DEPTH` and files larger than :data:`MAX_FILE_BYTES`. Problems are returned as
:class:`~reconciler.config.errors.ConfigIssue` values, never raised, so one pass reports them all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler.config.errors import ConfigIssue

MAX_FILE_BYTES = 1024 * 1024
"""Files larger than this are refused unread: a desired-state file is a few kilobytes."""

MAX_DEPTH = 64
"""Deepest allowed nesting of mappings and sequences."""

YAML_SUFFIXES = (".yaml", ".yml")

_STR = "tag:yaml.org,2002:str"
_PLAIN = "tag:esxi-reconciler:plain"  # a plain scalar without tag: the only kind that is resolved
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_ALLOWED_EXPLICIT_TAGS = {_STR, _SEQ, _MAP}

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL_TRUE = re.compile(r"^(?:true|True|TRUE)$")
_BOOL_FALSE = re.compile(r"^(?:false|False|FALSE)$")
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
_FLOAT = re.compile(
    r"^[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?)$"
)

# git writes a marker at the start of a line: 7 characters, then a space and a label for <<<<<<<,
# >>>>>>> and ||||||| (diff3 base), or nothing at all (======= always; the others with an empty label).
_CONFLICT_MARKER = re.compile(r"^(?:(?:<{7}|>{7}|\|{7})(?: [^\r\n]*)?|={7})\r?$", re.MULTILINE)
_CONFLICT_OPEN_OR_CLOSE = re.compile(r"^(?:<{7}|>{7})(?: [^\r\n]*)?\r?$", re.MULTILINE)

PathElement = str | int
"""One step of a path into a document: a mapping key or a sequence index."""


def scalar_value(node: ScalarNode) -> Any:
    """The Python value of a scalar node under this module's YAML-1.2-core-like rules."""
    text: str = node.value
    if node.tag != _PLAIN:
        return text  # quoted, block or explicitly tagged (!!str, !): always a string
    if _NULL.match(text):
        return None
    if _BOOL_TRUE.match(text):
        return True
    if _BOOL_FALSE.match(text):
        return False
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return text


def format_path(path: Sequence[PathElement]) -> str:
    """``("spec", "vms", "names", 2)`` → ``spec.vms.names[2]``."""
    out = ""
    for element in path:
        if isinstance(element, int):
            out += f"[{element}]"
        else:
            out += f".{element}" if out else element
    return out


@dataclass(frozen=True)
class Document:
    """One YAML document of a file: its plain data and the node tree that knows positions."""

    file: str
    """Path of the file relative to the config directory, with ``/`` separators."""
    index: int
    """0-based position of the document in its file."""
    node: Node
    data: Any

    def find(self, path: Sequence[PathElement]) -> tuple[ScalarNode | None, Node | None]:
        """The key node and value node at ``path``; the deepest existing ones if the path is missing."""
        key: ScalarNode | None = None
        node: Node = self.node
        for element in path:
            if isinstance(node, MappingNode) and isinstance(element, str):
                for key_node, value_node in node.value:
                    if key_node.value == element:
                        key, node = key_node, value_node
                        break
                else:
                    return key, node
            elif isinstance(node, SequenceNode) and isinstance(element, int) and element < len(node.value):
                key, node = None, node.value[element]
            else:
                return key, node
        return key, node

    def position(self, path: Sequence[PathElement]) -> tuple[int, int]:
        """1-based (line, column) for ``path``: the key of a mapping entry, else the value itself."""
        key, node = self.find(path)
        target = key if key is not None else node
        if target is None:
            return 1, 1
        mark = target.start_mark
        return mark.line + 1, mark.column + 1

    def issue(self, path: Sequence[PathElement], message: str) -> ConfigIssue:
        """A :class:`ConfigIssue` located at ``path`` of this document."""
        line, column = self.position(path)
        return ConfigIssue(self.file, line, column, format_path(path), message)


class _Problem(Exception):
    """A fatal problem inside one file (stops composing that file)."""

    def __init__(self, mark: Any, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class _Composer(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's reader, scanner and parser with a composer of our own (no resolver, no constructor)."""

    def __init__(self, text: str, file: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        self.file = file
        self.issues: list[ConfigIssue] = []

    def _issue(self, mark: Any, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, mark.line + 1, mark.column + 1, "", message))

    def _get(self) -> Any:
        return self.get_event()  # type: ignore[no-untyped-call]

    def _peek(self) -> Any:
        return self.peek_event()  # type: ignore[no-untyped-call]

    def documents(self) -> Iterator[Node]:
        self._get()  # StreamStartEvent
        while not self.check_event(StreamEndEvent):
            self._get()  # DocumentStartEvent
            node = self._node(1)
            self._get()  # DocumentEndEvent
            yield node

    def _node(self, depth: int) -> Node:
        event: Any = self._peek()
        start: Any = event.start_mark
        stop: Any = event.end_mark
        if type(event) is AliasEvent:
            self._get()
            self._issue(start, f"aliases are not allowed (*{event.anchor}); write the value out")
            return ScalarNode(_STR, "", start, stop, style="'")
        if event.anchor is not None:
            self._issue(start, f"anchors are not allowed (&{event.anchor}); write values out")
        tag = event.tag
        if tag not in (None, "!") and tag not in _ALLOWED_EXPLICIT_TAGS:
            self._issue(start, f"explicit tag {tag} is not allowed; only !!str is (or quote the value)")
        if depth > MAX_DEPTH:
            raise _Problem(start, f"nesting deeper than {MAX_DEPTH} levels")
        if type(event) is ScalarEvent:
            self._get()
            # Only a plain scalar without any tag goes through scalar_value's resolution.
            plain = tag is None and event.style is None
            return ScalarNode(_PLAIN if plain else _STR, event.value, start, stop, style=event.style)
        self._get()
        if type(event) is SequenceStartEvent:
            items: list[Node] = []
            while not self.check_event(SequenceEndEvent):
                items.append(self._node(depth + 1))
            end: Any = self._get().end_mark
            return SequenceNode(_SEQ, items, start, end, flow_style=event.flow_style)
        pairs: list[tuple[Node, Node]] = []
        seen: dict[str, int] = {}
        while not self.check_event(MappingEndEvent):
            key = self._node(depth + 1)
            value = self._node(depth + 1)
            if not isinstance(key, ScalarNode):
                self._issue(key.start_mark, "mapping keys must be plain strings")
                continue
            if key.value in seen:
                self._issue(
                    key.start_mark,
                    f"duplicate key {key.value!r} (first defined at line {seen[key.value]});"
                    " YAML would silently keep only the last one",
                )
                continue
            seen[key.value] = key.start_mark.line + 1
            pairs.append((key, value))
        end = self._get().end_mark
        return MappingNode(_MAP, pairs, start, end, flow_style=event.flow_style)


def to_data(node: Node) -> Any:
    """Plain Python data (dict/list/str/int/float/bool/None) of a composed node tree."""
    if isinstance(node, ScalarNode):
        return scalar_value(node)
    if isinstance(node, SequenceNode):
        return [to_data(item) for item in node.value]
    assert isinstance(node, MappingNode)
    return {key.value: to_data(value) for key, value in node.value}


def conflict_marker(text: str, file: str) -> ConfigIssue | None:
    """The issue of a file left with git conflict markers by a failed merge, located at its first
    marker; None when there is none. A line ``=======`` alone can be text (a heading underlined in a
    block scalar), so only a file with a ``<<<<<<<`` or ``>>>>>>>`` line counts as conflicted."""
    if _CONFLICT_OPEN_OR_CLOSE.search(text) is None:
        return None
    first = _CONFLICT_MARKER.search(text)
    assert first is not None  # the open or close marker is one
    line = text.count("\n", 0, first.start()) + 1
    marker = first.group().rstrip("\r")
    shown = marker if len(marker) <= 60 else marker[:59] + "…"
    return ConfigIssue(
        file,
        line,
        1,
        "",
        f"unresolved merge conflict: git conflict marker {shown!r} (a merge left both versions in the file);"
        " resolve the conflict (keep the right lines, delete the <<<<<<<, ======= and >>>>>>> lines) and"
        " commit",
    )


def parse_text(text: str, file: str) -> tuple[list[Document], list[ConfigIssue]]:
    """Compose every document of ``text``; empty documents (only comments, a trailing ``---``) are skipped.

    If the file has any problem, no document of it is returned: a half-read file must not be
    mistaken for a complete one. A file with git conflict markers gets that one issue and is not parsed.
    """
    conflict = conflict_marker(text, file)
    if conflict is not None:
        return [], [conflict]
    composer = _Composer(text, file)
    nodes: list[Node] = []
    try:
        nodes.extend(composer.documents())
    except _Problem as problem:
        composer._issue(problem.mark, problem.message)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = "YAML syntax error: " + (error.problem or error.context or "invalid YAML")
        if error.context and error.problem:
            message += f" ({error.context})"
        if mark is None:
            composer.issues.append(ConfigIssue(file, 0, 0, "", message))
        else:
            composer._issue(mark, message)
    except yaml.YAMLError as error:  # reader errors: bad characters, bad encoding
        composer.issues.append(ConfigIssue(file, 0, 0, "", f"cannot read YAML: {error}"))
    if composer.issues:
        return [], composer.issues
    documents = [
        Document(file, index, node, to_data(node))
        for index, node in enumerate(nodes)
        if not (isinstance(node, ScalarNode) and scalar_value(node) is None)
    ]
    return documents, []


def read_file(path: Path, file: str) -> tuple[bytes | None, list[Document], list[ConfigIssue]]:
    """Read and parse one file: its bytes (None if unreadable or too large), documents and issues.

    Files over :data:`MAX_FILE_BYTES` are refused without being read whole.
    """
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        return None, [], [ConfigIssue(file, 0, 0, "", f"cannot read file: {error.strerror or error}")]
    if len(raw) > MAX_FILE_BYTES:
        limit = MAX_FILE_BYTES // 1024
        return (
            None,
            [],
            [ConfigIssue(file, 0, 0, "", f"file is larger than {limit} KiB; split it into several files")],
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        return raw, [], [ConfigIssue(file, 0, 0, "", f"file is not valid UTF-8 (byte {error.start})")]
    documents, issues = parse_text(text, file)
    return raw, documents, issues


def find_files(root: Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` file under ``root`` (or ``root`` itself if it is a file), sorted.

    Names starting with a dot (``.git``, editor swap files, ``.hidden.yaml``) are skipped at every level.
    Symbolic links to files are followed; links to directories are not (no loops).
    """
    if root.is_file():
        return [root]
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found.extend(
            Path(directory, name)
            for name in files
            if not name.startswith(".") and name.endswith(YAML_SUFFIXES)
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def display_name(path: Path, root: Path) -> str:
    """The name used in messages: relative to the config directory, or the file name for a single file."""
    if root.is_file():
        return path.name
    return path.relative_to(root).as_posix()
