"""``repo key passwd|import|list``: the passphrase change survives being killed at every step, and a
saved key file brings a repository back."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli import main
from reconciler.repository import KdfParams, Repository, WrongKeyError, export_key, list_keys
from tests.unit.test_cli_outcomes import check
from tests.unit.test_repo_cli import PASSPHRASE, _config

pytestmark = pytest.mark.usefixtures("restore_logging")

FAST_KDF = KdfParams(memory_kib=64, iterations=1, lanes=1)
OLD, NEW, OTHER = "0ld-Secret-7", "n3w-Secret-9", "c0lleague-Secret-2"
_PATCHED = ("open", "write", "fsync", "close", "link", "rename", "replace", "unlink")
"""The os functions the change goes through (writing, syncing, linking and deleting key files)."""


def _template(tmp_path: Path) -> tuple[Path, str]:
    """A repository with data, two key files of OLD (as after `repo key import` of an export) and one
    of OTHER; returns its path and a point id."""
    path = tmp_path / "template"
    repo = Repository.init(path, OLD, kdf=FAST_KDF)
    repo.add_key(OLD, FAST_KDF)
    repo.add_key(OTHER, FAST_KDF)
    writer = repo.chunk_writer(3 * 2**20)
    for i in range(3):
        writer.write(i * 2**20, bytes([i + 1]) * 2**20)
    return path, writer.finish()


def _change_in_child(path: Path, kill_at: int | None) -> int:
    """Run the change in a forked child that SIGKILLs itself at its ``kill_at``-th call of an os function
    of :data:`_PATCHED` (a real kill: no handler, no clean-up); return the child's wait status, or with
    ``kill_at=None`` the number of such calls a complete change makes (sent back through a pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        calls = 0
        originals = {name: getattr(os, name) for name in _PATCHED}

        def counting(name: str) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return originals[name](*args, **kwargs)

            return call

        try:
            repo = Repository.open(path, OLD)
            for name in _PATCHED:
                setattr(os, name, counting(name))
            repo.change_passphrase(OLD, NEW, FAST_KDF)
            total = calls
            for name in _PATCHED:
                setattr(os, name, originals[name])
            os.write(write_end, str(total).encode())
            os._exit(0)
        except BaseException:  # noqa: BLE001  the forked child must end in os._exit whatever happens, never return into pytest
            os._exit(3)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        told = pipe.read()
    if kill_at is None:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        return int(told)
    return status


def _opens(path: Path, passphrase: str) -> Repository | None:
    try:
        return Repository.open(path, passphrase)
    except WrongKeyError:
        return None


def _finish_like_the_cli(path: Path) -> None:
    """What running `repo key passwd` again does: change from OLD if it still opens, else accept NEW."""
    repo = _opens(path, OLD)
    if repo is not None:
        repo.change_passphrase(OLD, NEW, FAST_KDF)
    else:
        assert _opens(path, NEW) is not None


def test_killed_at_every_step_the_repository_stays_open_and_a_rerun_completes(tmp_path: Path) -> None:
    template, index_id = _template(tmp_path)
    expected = Repository.open(template, OLD).read_index(index_id)
    steps = _change_in_child(_copy(template, tmp_path / "count"), None)
    assert steps > 10  # writes, syncs, a link and deletes at the least
    print(f"killed at each of {steps} steps")
    outcomes = set()
    for kill_at in range(1, steps + 1):
        path = _copy(template, tmp_path / f"kill-{kill_at}")
        status = _change_in_child(path, kill_at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (kill_at, status)
        old, new = _opens(path, OLD), _opens(path, NEW)
        assert old is not None or new is not None, f"killed at step {kill_at}: no passphrase opens it"
        for repo in (r for r in (old, new) if r is not None):
            assert repo.read_index(index_id) == expected  # and the data is readable with it
        outcomes.add((old is not None, new is not None))
        assert _opens(path, OTHER) is not None  # another passphrase's key file is never touched

        _finish_like_the_cli(path)
        assert _opens(path, OLD) is None
        assert (done := _opens(path, NEW)) is not None and done.read_index(index_id) == expected
        keys = list_keys(path, NEW)
        assert sum(1 for k in keys if k.opens) == 1, f"killed at step {kill_at}: {keys}"
        assert len(keys) == 2  # NEW's and OTHER's
    # the kill points covered every state: only OLD, both, only NEW
    assert outcomes == {(True, False), (True, True), (False, True)}


def _copy(template: Path, to: Path) -> Path:
    shutil.copytree(template, to)
    return to


def test_change_passphrase_needs_the_old_passphrase_and_a_different_new_one(tmp_path: Path) -> None:
    template, _ = _template(tmp_path)
    repo = Repository.open(template, OTHER)
    with pytest.raises(WrongKeyError, match="old passphrase does not open"):
        repo.change_passphrase(OLD, NEW, FAST_KDF)  # opened with OTHER: OLD's key files must stay
    with pytest.raises(ValueError, match="same as the current one"):
        repo.change_passphrase(OTHER, OTHER, FAST_KDF)
    assert _opens(template, OLD) is not None and len(list_keys(template)) == 3


# -- the CLI ---------------------------------------------------------------------------------------------


def _new_passphrase_file(tmp_path: Path, text: str = NEW) -> Path:
    path = tmp_path / "new.pass"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_passwd_changes_the_passphrase_and_says_what_to_do_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    repo_id = Repository.open(tmp_path / "repo", PASSPHRASE).id
    new_file = _new_passphrase_file(tmp_path)
    capsys.readouterr()

    args = ["--config", str(cfg), "repo", "key", "passwd", "nas", "--new-passphrase-file", str(new_file)]
    assert main([*args, "-y", "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    check("repo-key-passwd", doc)
    assert doc["ok"] is True and doc["already_changed"] is False and doc["others"] == []
    assert len(doc["removed"]) == 1 and doc["secret"] == f"file {tmp_path / 'nas.key'}"
    assert f"now put the new passphrase where the configuration reads it (file {tmp_path / 'nas.key'})" in err
    assert "export the new one" in err
    assert PASSPHRASE not in out + err and NEW not in out + err
    assert _opens(tmp_path / "repo", PASSPHRASE) is None
    assert (repo := _opens(tmp_path / "repo", NEW)) is not None and repo.id == repo_id
    assert [k.id for k in list_keys(tmp_path / "repo")] == [doc["key_id"]]

    # again, the config still holding the old passphrase: the change was made already
    assert main([*args, "-y"]) == 0
    out, _ = capsys.readouterr()
    assert "the new passphrase opens repository nas" in out and "already" in out
    # the config updated: the "new" passphrase is now the configured one
    (tmp_path / "nas.key").write_text(NEW + "\n")
    assert main([*args, "-y"]) == 64
    assert "is the one configured" in capsys.readouterr().err


def test_passwd_refuses_without_a_terminal_or_a_new_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path)
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    keys_before = list_keys(tmp_path / "repo")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    base = ["--config", str(cfg), "repo", "key", "passwd", "nas"]
    assert main(base) == 64
    assert "no terminal to ask for the new passphrase" in capsys.readouterr().err
    new_file = _new_passphrase_file(tmp_path)
    assert main([*base, "--new-passphrase-file", str(new_file)]) == 64
    assert (
        "not asking without a terminal (or with --json): pass --yes; nothing changed"
        in capsys.readouterr().err
    )
    new_file.chmod(0o644)
    assert main([*base, "--new-passphrase-file", str(new_file), "--yes"]) == 64
    assert "run: chmod 600" in capsys.readouterr().err
    monkeypatch.setenv("NEW_PASSPHRASE", NEW)
    (tmp_path / "nas.key").write_text("not the passphrase\n")
    assert main([*base, "--new-passphrase-env", "NEW_PASSPHRASE", "--yes"]) == 1
    assert "neither the configured key secret" in capsys.readouterr().err
    assert list_keys(tmp_path / "repo") == keys_before


def test_key_import_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    saved = tmp_path / "saved.key"
    assert main(["--config", str(cfg), "repo", "key", "export", "nas", "--out", str(saved)]) == 0
    for key in (tmp_path / "repo" / "keys").iterdir():
        key.unlink()  # keys/ lost
    assert _opens(tmp_path / "repo", PASSPHRASE) is None
    capsys.readouterr()

    assert main(["--config", str(cfg), "repo", "key", "import", "nas", str(saved)]) == 0
    out, _ = capsys.readouterr()
    key_id = json.loads(saved.read_bytes())["id"]
    assert out.startswith(f"imported key {key_id} into repository nas")
    assert _opens(tmp_path / "repo", PASSPHRASE) is not None

    assert main(["--config", str(cfg), "repo", "key", "import", "nas", str(saved), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    check("repo-key-import", doc)
    assert (
        doc["already_present"] is True and doc["key_id"] == key_id and doc["configured_secret_opens"] is True
    )

    assert main(["--config", str(cfg), "repo", "key", "list", "nas", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    check("repo-key-list", doc)
    assert [(k["id"], k["opens"]) for k in doc["keys"]] == [(key_id, True)]


def test_key_import_of_an_old_passphrases_key_and_of_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    path = tmp_path / "repo"
    saved = tmp_path / "saved.key"
    saved.write_bytes(export_key(path))  # saved under PASSPHRASE ...
    Repository.open(path, PASSPHRASE).change_passphrase(PASSPHRASE, NEW, FAST_KDF)  # ... then changed
    (tmp_path / "nas.key").write_text(NEW + "\n")
    capsys.readouterr()

    base = ["--config", str(cfg), "repo", "key", "import", "nas"]
    assert main([*base, str(saved)]) == 1  # the configured (new) passphrase does not open it
    assert "does not open key file" in capsys.readouterr().err
    old_file = _new_passphrase_file(tmp_path, PASSPHRASE)
    assert main([*base, str(saved), "--passphrase-file", str(old_file)]) == 0
    out, err = capsys.readouterr()
    assert "imported key" in out and "note:" not in err  # the configured secret opens the repository still
    assert _opens(path, PASSPHRASE) is not None and _opens(path, NEW) is not None

    other = tmp_path / "other"
    other.mkdir()
    other_cfg = _config(other)
    assert main(["--config", str(other_cfg), "repo", "init", "nas"]) == 0
    capsys.readouterr()
    assert main(["--config", str(other_cfg), "repo", "key", "import", "nas", str(saved)]) == 64
    assert "belongs to repository" in capsys.readouterr().err
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key file")
    assert main([*base, str(garbage)]) == 64
    assert "not valid JSON; give a file written by `repo key export`" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "missing.key")]) == 64
    assert "cannot read" in capsys.readouterr().err


def test_passwd_asks_for_the_new_passphrase_twice_and_then_to_go_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path)
    assert main(["--config", str(cfg), "repo", "init", "nas"]) == 0
    keys_before = list_keys(tmp_path / "repo")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    typed: list[str] = []
    monkeypatch.setattr("getpass.getpass", lambda prompt: typed.pop(0))
    base = ["--config", str(cfg), "repo", "key", "passwd", "nas"]

    typed[:] = [NEW, NEW + "x"]
    monkeypatch.setattr("sys.stdin", Terminal(""))
    assert main(base) == 64
    assert "the two passphrases differ" in capsys.readouterr().err

    typed[:] = [NEW, NEW]
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert main(base) == 1  # declined
    err = capsys.readouterr().err
    assert f"Change the passphrase of repository nas ({tmp_path / 'repo'})?" in err
    assert "not confirmed; nothing changed" in err
    assert list_keys(tmp_path / "repo") == keys_before

    typed[:] = [NEW, NEW]
    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert main(base) == 0
    assert "changed the passphrase of repository nas" in capsys.readouterr().out
    assert _opens(tmp_path / "repo", NEW) is not None and _opens(tmp_path / "repo", PASSPHRASE) is None
