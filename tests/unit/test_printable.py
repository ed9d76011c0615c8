"""``printable``: the one rule for showing names from outside to a person."""

from __future__ import annotations

import pytest

from reconciler.printable import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("web01", "web01"),
        ('ファイル鯖 "q" $(x) \\ *', 'ファイル鯖 "q" $(x) \\ *'),  # every script, quotes, backslash: as is
        ("web01\n+ backup evil", "web01\\n+ backup evil"),
        ("cr\r\nlf", "cr\\r\\nlf"),
        ("tab\tx", "tab\\tx"),
        ("esc\x1b[2Jx", "esc\\x1b[2Jx"),
        ("del\x7f nul\x00 bell\x07", "del\\x7f nul\\x00 bell\\x07"),
        ("c1\x85 \x9b", "c1\\x85 \\x9b"),  # NEL, CSI
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),  # Unicode line and paragraph separators
        ("bidi\u202eabc", "bidi\\u202eabc"),  # right-to-left override
        ("", ""),
    ],
)
def test_control_characters_are_escaped_and_the_rest_kept(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert shown.isprintable()  # one line, nothing the terminal would act on
