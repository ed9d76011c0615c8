"""Reading YAML safely: no YAML 1.1 surprises, no duplicate keys, no aliases, bounded size and depth."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import ConfigError, load_config
from reconciler.config.documents import MAX_FILE_BYTES, find_files, format_path, parse_text, read_file


def data(text: str) -> Any:
    documents, issues = parse_text(textwrap.dedent(text), "t.yaml")
    assert issues == []
    assert len(documents) == 1
    return documents[0].data


def problems(text: str) -> list[str]:
    documents, issues = parse_text(textwrap.dedent(text), "t.yaml")
    assert documents == []  # a file with a problem yields no document at all
    return [str(issue) for issue in issues]


@pytest.mark.parametrize(
    ("plain", "value"),
    [
        # YAML 1.1 booleans stay strings
        ("yes", "yes"),
        ("Yes", "Yes"),
        ("no", "no"),
        ("NO", "NO"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("n", "n"),
        # the YAML 1.2 core booleans and nulls
        ("true", True),
        ("False", False),
        ("TRUE", True),
        ("null", None),
        ("~", None),
        ("", None),
        # no octal, hex, binary, underscores or sexagesimal
        ("012", "012"),
        ("0o12", "0o12"),
        ("0x1F", "0x1F"),
        ("0b11", "0b11"),
        ("1_000", "1_000"),
        ("02:00", "02:00"),
        ("2:00", "2:00"),
        ("190:20:30", "190:20:30"),
        # dates and times stay strings
        ("2026-12-24", "2026-12-24"),
        ("2026-12-24T02:00:00Z", "2026-12-24T02:00:00Z"),
        # special floats stay strings
        (".inf", ".inf"),
        ("-.inf", "-.inf"),
        (".nan", ".nan"),
        # plain decimal numbers are numbers
        ("0", 0),
        ("42", 42),
        ("-7", -7),
        ("+3", 3),
        ("1.5", 1.5),
        ("10.", 10.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        # merge key and value indicator are just strings
        ("<<", "<<"),
        ("=", "="),
    ],
)
def test_plain_scalars(plain: str, value: Any) -> None:
    result = data(f"key: {plain}\n")["key"]
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize("quoted", ["'true'", '"42"', "'~'", '"null"', "!!str 12", "!!str yes", "! 12"])
def test_quoted_and_str_tagged_scalars_are_strings(quoted: str) -> None:
    assert isinstance(data(f"key: {quoted}\n")["key"], str)


def test_block_scalars_are_strings() -> None:
    assert data("key: |\n  42\n")["key"] == "42\n"


def test_keys_are_always_strings() -> None:
    assert data("1: a\nyes: b\nnull: c\n") == {"1": "a", "yes": "b", "null": "c"}


def test_duplicate_keys_are_errors_with_both_places() -> None:
    assert problems(
        """\
        spec:
          ssh:
            port: 22
            port: 2222
          ssh: {}
        """
    ) == [
        "t.yaml:4:5 duplicate key 'port' (first defined at line 3); YAML would silently keep only the last"
        " one",
        "t.yaml:5:3 duplicate key 'ssh' (first defined at line 2); YAML would silently keep only the last"
        " one",
    ]


def test_quoting_does_not_hide_a_duplicate_key() -> None:
    assert problems("port: 1\n'port': 2\n") == [
        "t.yaml:2:1 duplicate key 'port' (first defined at line 1); YAML would silently keep only the last"
        " one"
    ]


def test_anchors_and_aliases_are_refused() -> None:
    assert problems(
        """\
        base: &defaults {port: 22}
        other:
          <<: *defaults
        """
    ) == [
        "t.yaml:1:7 anchors are not allowed (&defaults); write values out",
        "t.yaml:3:7 aliases are not allowed (*defaults); write the value out",
    ]


def test_billion_laughs_is_refused_without_expanding() -> None:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    _, issues = parse_text("\n".join(lines) + "\n", "t.yaml")
    assert len(issues) == 10 + 9 * 9  # every anchor and alias named, nothing expanded
    assert all("are not allowed" in issue.message for issue in issues)


@pytest.mark.parametrize("tag", ["!!python/object:os.system", "!!binary", "!!timestamp", "!!int", "!custom"])
def test_explicit_tags_other_than_str_are_refused(tag: str) -> None:
    assert problems(f"key: {tag} 12\n") == [
        f"t.yaml:1:6 explicit tag {tag.replace('!!', 'tag:yaml.org,2002:')} is not allowed; only !!str is"
        " (or quote the value)"
    ]


def test_complex_keys_are_refused() -> None:
    assert problems("? [a, b]\n: c\n") == ["t.yaml:1:3 mapping keys must be plain strings"]


def test_nesting_is_bounded() -> None:
    assert problems("[" * 100 + "]" * 100 + "\n") == ["t.yaml:1:65 nesting deeper than 64 levels"]


def test_syntax_error_is_located() -> None:
    assert problems("spec:\n  a: 1\n b: 2\n") == [
        "t.yaml:3:2 YAML syntax error: expected <block end>, but found '<block mapping start>' (while"
        " parsing a"
        " block mapping)"
    ]


def test_tab_indentation_is_located() -> None:
    found = problems("spec:\n\tport: 1\n")
    assert len(found) == 1
    assert found[0].startswith("t.yaml:2:1 YAML syntax error: found character '\\t'")


def test_multiple_documents_and_empty_ones() -> None:
    documents, issues = parse_text("---\na: 1\n---\n# only a comment\n---\nb: 2\n...\n---\n", "t.yaml")
    assert issues == []
    assert [d.data for d in documents] == [{"a": 1}, {"b": 2}]
    assert [d.index for d in documents] == [0, 2]


def test_positions_and_paths() -> None:
    documents, _ = parse_text("a: 1\n---\nspec:\n  list:\n    - x\n    - {k: v}\n", "t.yaml")
    doc = documents[1]
    assert doc.position(["spec", "list", 1, "k"]) == (6, 8)  # the key
    assert doc.position(["spec", "list", 0]) == (5, 7)  # a list item: the value
    assert doc.position(["spec", "missing"]) == (3, 1)  # deepest existing: the spec key
    assert doc.position([]) == (3, 1)
    assert format_path(["spec", "list", 1, "k"]) == "spec.list[1].k"


def test_huge_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    raw, documents, issues = read_file(path, "big.yaml")
    assert raw is None and documents == []
    assert [str(i) for i in issues] == ["big.yaml file is larger than 1024 KiB; split it into several files"]


def test_file_at_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_bytes(b"a: 1\n" + b"#" * (MAX_FILE_BYTES - 6) + b"\n")
    _, documents, issues = read_file(path, "ok.yaml")
    assert issues == [] and [d.data for d in documents] == [{"a": 1}]


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"a: \xff\n")
    _, _, issues = read_file(path, "bad.yaml")
    assert [str(i) for i in issues] == ["bad.yaml file is not valid UTF-8 (byte 3)"]


def test_utf8_bom_and_japanese_names(tmp_path: Path) -> None:
    path = tmp_path / "jp.yaml"
    path.write_bytes('\ufeffnames: [ファイル鯖 "q" $(x), db 01]\n'.encode())
    _, documents, issues = read_file(path, "jp.yaml")
    assert issues == [] and documents[0].data == {"names": ['ファイル鯖 "q" $(x)', "db 01"]}


def test_directory_tree_skips_dotfiles_and_other_suffixes(tmp_path: Path) -> None:
    for name in [
        "a.yaml",
        "sub/b.yml",
        "sub/deeper/c.yaml",
        ".hidden.yaml",
        ".git/x.yaml",
        "sub/.d/e.yaml",
        "notes.txt",
        "x.yaml~",
        "README.md",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("a: 1\n")
    assert [p.relative_to(tmp_path).as_posix() for p in find_files(tmp_path)] == [
        "a.yaml",
        "sub/b.yml",
        "sub/deeper/c.yaml",
    ]


def test_yaml_problems_of_all_files_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a: 1\na: 2\n")
    (tmp_path / "b.yaml").write_text("b: &x 1\n")
    (tmp_path / "c.yaml").write_bytes(b"# x\n" * (MAX_FILE_BYTES // 4 + 1))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert [str(i) for i in caught.value.issues] == [
        "a.yaml:2:1 duplicate key 'a' (first defined at line 1); YAML would silently keep only the last one",
        "b.yaml:1:4 anchors are not allowed (&x); write values out",
        "c.yaml file is larger than 1024 KiB; split it into several files",
    ]


CONFLICT_FIX = (
    " (a merge left both versions in the file); resolve the conflict (keep the right lines, delete the"
    " <<<<<<<, ======= and >>>>>>> lines) and commit"
)


def test_git_conflict_markers_are_one_error_at_the_first_marker() -> None:
    """A failed merge on the NAS: the markers are named at their own line, not at a YAML error after them."""
    conflicted = """\
        apiVersion: esxi-reconciler/v1
        kind: Repository
        metadata: {name: nas}
        spec:
        <<<<<<< HEAD
          backend: {type: local, path: /srv/a}
        =======
          backend: {type: local, path: /srv/b}
        >>>>>>> feature/offsite
          encryption: {enabled: false}
        """
    assert problems(conflicted) == [
        f"t.yaml:5:1 unresolved merge conflict: git conflict marker '<<<<<<< HEAD'{CONFLICT_FIX}"
    ]
    # diff3 style, CRLF line ends, a marker in the first line, and half-resolved files
    assert problems(
        "<<<<<<< ours\r\na: 1\r\n||||||| base\r\na: 0\r\n=======\r\na: 2\r\n>>>>>>> theirs\r\n"
    ) == [f"t.yaml:1:1 unresolved merge conflict: git conflict marker '<<<<<<< ours'{CONFLICT_FIX}"]
    assert problems("a: 1\nb: 2\n=======\nb: 3\n>>>>>>> main\n") == [
        f"t.yaml:3:1 unresolved merge conflict: git conflict marker '======='{CONFLICT_FIX}"
    ]
    assert problems("a: 1\n<<<<<<<\nb: 2\n") == [
        f"t.yaml:2:1 unresolved merge conflict: git conflict marker '<<<<<<<'{CONFLICT_FIX}"
    ]


def test_lookalikes_of_conflict_markers_are_yaml() -> None:
    """``=======`` alone (a heading underline in a block scalar), indented or longer runs are not markers."""
    assert data("note: |\n  Title\n  =======\n  <<<<<<< not at the line start\n") == {
        "note": "Title\n=======\n<<<<<<< not at the line start\n"
    }
    assert data("a: '<<<<<<<<'\n# >>>>>>> in a comment\n") == {"a": "<<<<<<<<"}


def test_conflict_markers_are_reported_for_every_file_of_the_config(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    (tmp_path / "hosts" / "esxi1.yaml").write_text("a: 1\n<<<<<<< HEAD\na: 2\n=======\na: 3\n>>>>>>> x\n")
    (tmp_path / "repo.yaml").write_text(
        "spec:\n  a: 1\n<<<<<<< Updated upstream\n  b: [\n=======\n>>>>>>> y\n"
    )
    (tmp_path / "ok.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: Repository\nmetadata: {name: r}\n"
        "spec: {backend: {type: local, path: /srv/r}, encryption: {enabled: false}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert [str(i) for i in caught.value.issues] == [
        f"hosts/esxi1.yaml:2:1 unresolved merge conflict: git conflict marker '<<<<<<< HEAD'{CONFLICT_FIX}",
        "repo.yaml:3:1 unresolved merge conflict: git conflict marker '<<<<<<< Updated upstream'"
        + CONFLICT_FIX,
    ]


def test_unquoted_date_time_is_a_valid_once_schedule(tmp_path: Path) -> None:
    """``once: 2026-12-24T02:00`` unquoted stays the string that was written (no datetime object)."""
    (tmp_path / "p.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: esxi-reconciler/v1
            kind: VerifyPolicy
            metadata: {name: check}
            spec:
              repository: nas
              schedule: {once: 2026-12-24T02:00, timezone: Asia/Tokyo}
            ---
            apiVersion: esxi-reconciler/v1
            kind: Repository
            metadata: {name: nas}
            spec:
              backend: {type: local, path: /srv/b}
              encryption: {enabled: no}
            """
        )
    )
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    # The only error is the YAML 1.1 "no": the unquoted date was fine.
    assert [str(i) for i in caught.value.issues] == [
        "p.yaml:13:16 spec.encryption.enabled: expected true or false, got 'no'; write true or false"
        " (yes/no/on/off are not booleans here)"
    ]
