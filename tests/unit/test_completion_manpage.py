"""Shell completion and the man page, generated from the parser: the bash script completes through
bash's own machinery (``complete -p``, the completion function, ``compgen``), VM names and point ids
come from the config's repository, the zsh script parses, and the man page renders without warnings."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconciler.cli import build_parser
from reconciler.commands.completion import completion_script
from reconciler.commands.manpage import manpage, roff
from reconciler.facts.points import DiskRecord, RestorePoint, VmRef, new_point_id
from reconciler.repository import CHUNK_SIZE, Repository

CLI = Path(sys.executable).parent / "esxi-reconciler"


def bash_complete(script: Path, words: list[str], program: str = "esxi-reconciler") -> list[str]:
    """What bash offers for the last of ``words`` (the word being typed), after sourcing ``script``:
    the function `complete -p` names for the program, called as bash calls it."""
    line = " ".join(f"'{w}'" for w in words)
    code = f"""
set -u
source '{script}'
spec=$(complete -p esxi-reconciler) || exit 3
function=$(sed -E 's/.* -F ([^ ]+) .*/\\1/' <<< "$spec")
COMP_WORDS=({line})
COMP_WORDS[0]='{program}'
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
"$function" esxi-reconciler "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return sorted(line for line in done.stdout.splitlines() if line)


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "esxi-reconciler.bash"
    path.write_text(completion_script(build_parser(), "bash"))
    return path


def test_the_bash_script_parses_and_registers_itself(bash_script: Path) -> None:
    subprocess.run(["bash", "-n", str(bash_script)], check=True, timeout=30)
    done = subprocess.run(
        ["bash", "-c", f"source '{bash_script}' && complete -p esxi-reconciler"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert done.stdout.strip().endswith(" esxi-reconciler")
    assert " -F " in done.stdout


def test_bash_completes_commands_subcommands_and_options(bash_script: Path) -> None:
    assert bash_complete(bash_script, ["esxi-reconciler", "re"]) == ["repo", "restore"]
    assert bash_complete(bash_script, ["esxi-reconciler", "points", "pro"]) == ["protect"]
    assert bash_complete(bash_script, ["esxi-reconciler", "repo", "key", ""]) == [
        "export",
        "import",
        "list",
        "passwd",
    ]
    assert "--new-passphrase-file" in bash_complete(
        bash_script, ["esxi-reconciler", "repo", "key", "passwd", "--"]
    )
    assert bash_complete(bash_script, ["esxi-reconciler", "schema", "b"]) == ["backup-policy"]
    assert bash_complete(bash_script, ["esxi-reconciler", "h"]) == ["history"]
    assert bash_complete(bash_script, ["esxi-reconciler", "notify", ""]) == ["test"]
    assert {"--vm", "--policy", "--since", "--kind", "--failed"} <= set(
        bash_complete(bash_script, ["esxi-reconciler", "history", "--"])
    )
    assert bash_complete(bash_script, ["esxi-reconciler", "history", "--kind", "no"]) == ["notify"]
    hidden = bash_complete(bash_script, ["esxi-reconciler", "_"])
    assert hidden == []  # the helper verbs are not offered


def _config_with_points(tmp_path: Path) -> tuple[Path, list[str]]:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "repo.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Repository
metadata: {{name: nas}}
spec:
  backend: {{type: local, path: {tmp_path / "repo"}}}
  encryption: {{enabled: false}}
"""
    )
    repo = Repository.init(tmp_path / "repo")
    ids = []
    for vm in ("web01", "web02", "db 01"):
        writer = repo.chunk_writer(CHUNK_SIZE)
        writer.write(0, vm.encode() * (CHUNK_SIZE // len(vm)) + b"x" * (CHUNK_SIZE % len(vm)))
        now = datetime.now(timezone.utc)
        point = RestorePoint(
            id=new_point_id(now),
            policy="nightly",
            vm=VmRef(vm, f"uuid-{vm}", "esxi1", "1"),
            started=now,
            snapshot_time=now,
            finished=now,
            status="success",
            mode="full",
            config_revision="r",
            disks=(DiskRecord(2000, "Hard disk 1", "x", CHUNK_SIZE, writer.finish()),),
        )
        repo.write_point(point)
        ids.append(point.id)
    return cfg, ids


def test_bash_completes_vm_names_and_point_ids_from_the_repository(bash_script: Path, tmp_path: Path) -> None:
    cfg, ids = _config_with_points(tmp_path)
    words = ["esxi-reconciler", "--config", str(cfg), "restore", "web"]
    assert bash_complete(bash_script, words, program=str(CLI)) == ["web01", "web02"]
    words = ["esxi-reconciler", "--config", str(cfg), "restore", ""]
    assert bash_complete(bash_script, words, program=str(CLI)) == ["db 01", "web01", "web02"]
    words = ["esxi-reconciler", "points", "forget", "--config", str(cfg), ids[0][:10]]
    assert bash_complete(bash_script, words, program=str(CLI)) == sorted(ids)
    assert bash_complete(
        bash_script, ["esxi-reconciler", "repo", "stats", "--config", str(cfg), ""], str(CLI)
    ) == ["nas"]
    (cfg / "notifiers.yaml").write_text(
        "apiVersion: esxi-reconciler/v1\nkind: Notifier\nmetadata: {name: ops-mail}\n"
        "spec: {url: 'json://127.0.0.1:1/hook'}\n"
    )
    words = ["esxi-reconciler", "--config", str(cfg), "notify", "test", "o"]
    assert bash_complete(bash_script, words, program=str(CLI)) == ["ops-mail"]
    # a config that cannot be read: nothing offered, nothing printed
    words = ["esxi-reconciler", "--config", str(tmp_path / "missing"), "restore", ""]
    assert bash_complete(bash_script, words, program=str(CLI)) == []


def test_complete_verb_prints_names_and_fails_silently(tmp_path: Path) -> None:
    cfg, ids = _config_with_points(tmp_path)
    done = subprocess.run(
        [CLI, "--config", str(cfg), "_complete", "points"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == sorted(ids) and done.stderr == ""
    done = subprocess.run(
        [CLI, "--config", str(tmp_path / "nothing"), "_complete", "vms"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "")


def zsh_complete(directory: Path, typed: str, expected: str) -> None:
    """Type ``typed`` and TAB into an interactive zsh (on a pseudo-terminal, compinit loading the script
    from ``directory``), then have it print the edited line; wait until that is ``expected`` (a timeout
    fails)."""
    setup = (
        f"fpath=({directory} $fpath); autoload -U compinit; compinit -u;"
        " dump() { zle -I; print -r -- \"BUF<$BUFFER>END\" }; zle -N dump; bindkey '^X' dump;"
        " PS1='RE''ADY> '"
    )
    pattern = "*BUF<" + expected.replace("\\", "\\\\") + ">END*"  # a backslash is literal in it
    code = f"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z {shlex.quote(setup)}
zpty -r z _ '*READY> *'
zpty -w -n z {shlex.quote(typed)}$'\\t'$'\\x18'
zpty -r z _ {shlex.quote(pattern)}
zpty -d z
"""
    subprocess.run(["zsh", "-f", "-c", code], check=True, timeout=60, capture_output=True)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is in the Makefile's APT_PACKAGES")
def test_the_zsh_script_parses_and_completes(tmp_path: Path) -> None:
    script = tmp_path / "_esxi-reconciler"
    script.write_text(completion_script(build_parser(), "zsh"))
    subprocess.run(["zsh", "-n", str(script)], check=True, timeout=30)
    assert script.read_text().startswith("#compdef esxi-reconciler")
    zsh_complete(tmp_path, f"{CLI} points pro", f"{CLI} points protect ")
    cfg, _ = _config_with_points(tmp_path)
    zsh_complete(tmp_path, f"{CLI} --config {cfg} restore db", f"{CLI} --config {cfg} restore db\\ 01 ")


def test_the_man_page_renders_without_warnings(tmp_path: Path) -> None:
    page = tmp_path / "esxi-reconciler.1"
    page.write_text(manpage(build_parser(), "9.9.9"))
    groff = subprocess.run(
        ["groff", "-k", "-man", "-ww", "-Tutf8", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert groff.returncode == 0 and groff.stderr == ""
    shown = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    text = shown.stdout
    assert "esxi-reconciler 9.9.9" in text
    for command in (
        "points forget",
        "repo key passwd",
        "repo key import",
        "repo stats",
        "schema",
        "completion",
        "history",
        "notify test",
    ):
        assert f"esxi-reconciler {command}\n" in text
    assert "esxi-reconciler repo key-export\n" not in text and "_complete" not in text  # unlisted
    assert text.count("--state-dir DIR\n") == 1  # the global options once
    assert "give --force to forget it anyway" not in text  # an error, not documentation
    words = " ".join(text.split())  # as justified, with line breaks and double spaces
    assert "A forgotten point is gone for good" in words  # a command's epilog is kept
    assert words.count("exit codes: 0 success") == 0 and words.count("64 usage error") == 1  # said once


def test_roff_escaping() -> None:
    assert roff("-v \\n .start 'x ü") == "\\-v \\en .start 'x \\[u00FC]"
    assert roff(".TH\n'quote") == "\\&.TH\n\\&'quote"
