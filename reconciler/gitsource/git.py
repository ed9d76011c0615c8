"""Running git, the CLI, as a subprocess: controlled environment, no prompts, bounded time.

Every git command of the source goes through :class:`GitRunner`. The environment is built from scratch
(:func:`isolated_env`): no system or global git config (``GIT_CONFIG_NOSYSTEM``, ``GIT_CONFIG_GLOBAL``),
so no credential helper, alias, hook path or ``url.insteadOf`` of the machine applies; no terminal
prompt; a private ``HOME``; only the protocols the source's URL needs; ssh through ``GIT_SSH_COMMAND``
with the deploy key, the pinned host keys and nothing else (:func:`ssh_command`). A command that
outlives its timeout is killed with its whole process group (git's ssh child included).

Errors are :class:`GitError` with one line for people: what failed and git's own last words, never
a secret (keys are passed as files, never on a command line).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.printable import printable

GIT = "git"
SSH = "ssh"
HOST_KEY_ALIAS = "git-source"
"""The name the pinned host keys are filed under in our known_hosts (``HostKeyAlias``), so the URL's
host and port spelling does not matter."""
_STDERR_MAX = 300


class GitError(Exception):
    """A git command failed or timed out; the message is one line naming what and why."""


def isolated_env(home: Path, *, protocols: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a git command (nothing is inherited but ``PATH``)."""
    env = {
        "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LC_ALL": "C",
        "LANG": "C",
        "TZ": "UTC",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": protocols,
        "GIT_NO_REPLACE_OBJECTS": "1",
        "SSH_ASKPASS_REQUIRE": "never",
    }
    env.update(extra or {})
    return env


def ssh_command(*, key_file: Path, known_hosts: Path, connect_timeout: int) -> str:
    """``GIT_SSH_COMMAND``: OpenSSH with only the deploy key and only the pinned host keys.

    git runs it through ``sh -c``, hence every path quoted.
    """
    options = [
        "-F",
        os.devnull,
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        f"IdentityFile={key_file}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        f"GlobalKnownHostsFile={os.devnull}",
        "-o",
        f"HostKeyAlias={HOST_KEY_ALIAS}",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        "PasswordAuthentication=no",
        "-o",
        "KbdInteractiveAuthentication=no",
        "-o",
        f"ConnectTimeout={connect_timeout}",
        "-o",
        "ServerAliveInterval=15",
        "-o",
        "ServerAliveCountMax=4",
        "-o",
        "LogLevel=ERROR",
    ]
    return " ".join(shlex.quote(part) for part in [SSH, *options])


_BOILERPLATE = ("hint:", "Please make sure you have the correct access rights", "and the repository exists.")
_HINTS = (
    ("Host key verification failed", "the server did not present a pinned host key (spec.ssh.host_keys)"),
    ("Permission denied (publickey", "the deploy key was refused (is it a deploy key of this repository?)"),
    ("couldn't find remote ref", "no such branch or tag on the remote"),
)


def last_words(stderr: bytes) -> str:
    """The lines of git's (and ssh's) stderr worth showing, on one line, with a hint for the usual
    causes."""
    lines = [printable(line.strip()) for line in stderr.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith(_BOILERPLATE)]
    if not lines:
        return ""
    text = "; ".join(lines[-3:])
    hints = [hint for marker, hint in _HINTS if marker in text]
    if hints:
        text += f" ({'; '.join(hints)})"
    return text if len(text) <= _STDERR_MAX else text[: _STDERR_MAX - 1] + "…"


@dataclass(frozen=True)
class Result:
    """What a git command returned."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "surrogateescape").strip()


@dataclass(frozen=True)
class GitRunner:
    """Runs git against one repository (``git_dir``, or the work tree at ``cwd``) with ``env``."""

    env: Mapping[str, str]
    timeout: float
    git_dir: Path | None = None
    config: Sequence[str] = field(default=())
    """``name=value`` settings passed with ``-c`` to every command."""

    def run(
        self,
        *args: str,
        what: str,
        cwd: Path | None = None,
        check: bool = True,
        stdin: bytes | None = None,
    ) -> Result:
        """Run ``git ARGS``; raise :class:`GitError` (naming ``what``) on failure when ``check``."""
        argv = [GIT]
        for setting in self.config:
            argv += ["-c", setting]
        if self.git_dir is not None:
            argv += ["--git-dir", str(self.git_dir)]
        argv += list(args)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(self.env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise GitError(f"{what}: cannot run git: {exc.strerror or exc}") from None
        try:
            out, err = proc.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise GitError(f"{what}: no answer within {self.timeout:g} s (killed)") from None
        except BaseException:
            _kill_group(proc)
            raise
        result = Result(proc.returncode, out, err)
        if check and result.returncode != 0:
            words = last_words(err)
            raise GitError(f"{what}: {words}" if words else f"{what}: git exited {result.returncode}")
        return result

    def text(self, *args: str, what: str, cwd: Path | None = None) -> str:
        """The stripped standard output of a command that must succeed."""
        return self.run(*args, what=what, cwd=cwd).text


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill git and everything it started (ssh), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
