"""The config revision: git commit and dirty flag inside a work tree, else a digest of the files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.config import Revision, config_revision, load_config
from reconciler.config.revision import files_digest

REPO = Path(__file__).resolve().parents[2]


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    directory = tmp_path / "repo" / "config.d"
    shutil.copytree(REPO / "config.example", directory)
    return directory


def test_digest_outside_git(config: Path) -> None:
    revision = load_config(config).revision
    assert revision.commit is None and revision.dirty is False
    assert revision.id == f"sha256:{revision.digest}" and len(revision.digest) == 64
    assert config_revision(config) == revision  # the same when the files are read again
    (config / "hosts" / "esxi1.yaml").write_text((config / "hosts" / "esxi1.yaml").read_text() + "# edit\n")
    assert config_revision(config).digest != revision.digest


def test_digest_depends_on_names_and_contents_not_order() -> None:
    a = files_digest([("a.yaml", b"1"), ("b.yaml", b"2")])
    assert a == files_digest([("b.yaml", b"2"), ("a.yaml", b"1")])
    assert a != files_digest([("a.yaml", b"2"), ("b.yaml", b"1")])
    assert a != files_digest([("a.yaml", b"1"), ("c.yaml", b"2")])


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_and_dirty_flag(config: Path) -> None:
    top = config.parent
    git(top, "init", "-q")
    (top / "README").write_text("outside the config dir\n")
    git(top, "add", ".")
    git(top, "commit", "-q", "-m", "config")
    head = git(top, "rev-parse", "HEAD")

    revision = load_config(config).revision
    assert revision == Revision(digest=revision.digest, commit=head, dirty=False)
    assert revision.id == f"git:{head}"

    (top / "README").write_text("changed, but not in the config dir\n")
    assert load_config(config).revision.dirty is False

    (config / "new.yaml").write_text("# untracked\n")
    dirty = load_config(config).revision
    assert dirty.dirty and dirty.id == f"git:{head}+dirty"
    assert str(dirty) == dirty.id


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_repository_without_commits_falls_back_to_digest(config: Path) -> None:
    git(config.parent, "init", "-q")
    assert load_config(config).revision.commit is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_single_file_config(config: Path) -> None:
    git(config, "init", "-q")
    git(config, "add", ".")
    git(config, "commit", "-q", "-m", "config")
    single = config / "hosts" / "esxi1.yaml"
    (config / "hosts" / "esxi2.yaml").write_text("# changed, but not the loaded file\n")
    revision = config_revision(single)
    assert revision.commit == git(config, "rev-parse", "HEAD") and revision.dirty is False
    single.write_text(single.read_text() + "# edit\n")
    assert config_revision(single).dirty is True


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_file_written_while_the_config_loads_is_not_mislabelled(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon reloads while someone writes a file: the load read the committed files, the git state
    asked afterwards sees the new one. The revision must not call the committed config dirty (nor the
    other way round): the load is repeated and sees the new file."""
    from reconciler.config import ConfigError
    from reconciler.config import revision as revision_module

    top = config.parent
    git(top, "init", "-q")
    git(top, "add", ".")
    git(top, "commit", "-q", "-m", "config")
    head = git(top, "rev-parse", "HEAD")
    real_git_state = revision_module.git_state
    broken = config / "broken.yaml"

    def written_meanwhile(directory: Path, pathspec: str = ".") -> tuple[str, bool] | None:
        # once, right after the first load read the files and before it asks git
        monkeypatch.setattr(revision_module, "git_state", real_git_state)
        broken.write_text("apiVersion: esxi-reconciler/v1\nkind: Nonsense\n")
        return real_git_state(directory, pathspec)

    monkeypatch.setattr(revision_module, "git_state", written_meanwhile)
    with pytest.raises(ConfigError, match=r"broken\.yaml"):  # the load was repeated and read it
        load_config(config)
    broken.unlink()
    assert load_config(config).revision.id == f"git:{head}"
