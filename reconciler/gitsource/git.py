"""Running git, the CLI, as a subprocess: controlled environment, no prompts, bounded time.

Every git command of the source goes through :class:`GitRunner`. The environment is built from scratch
(:func:`isolated_env`): no system or global git config (``GIT_CONFIG_NOSYSTEM``, ``GIT_CONFIG_GLOBAL``),
so no credential helper, alias, hook path or ``url.insteadOf`` of the machine applies; no terminal
prompt; a private ``HOME``; only the protocols the source's URL needs; ssh through ``GIT_SSH_COMMAND``
with the deploy key, the pinned host keys and nothing else (:func:`ssh_command`); HTTPS with the
token answered by a credential helper that reads a private file (:func:`https_config`), certificates
always verified. A command that outlives its timeout is killed with its whole process group (git's ssh
child included).

Errors are :class:`GitError` with one line for people: what failed and git's own last words, never
a secret (keys and tokens are passed as files, never on a command line or in the environment, and
whatever the runner is told is secret is cut out of git's stderr).
"""

from __future__ import annotations

import base64
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


def https_config(*, credentials: Path | None, ca_file: Path | None, empty_dir: Path) -> list[str]:
    """``-c`` settings of a fetch over HTTPS.

    ``credentials`` (a private file of ``username=…``/``password=…`` lines, git's credential format) is
    answered by a one-line credential helper to git's ``get`` and nothing else, so the token never
    becomes an argument, an environment value or part of the clone's config; git sends it only after
    the server asks (401). Redirects are not followed: a redirect to another host would otherwise be
    answered with the token. ``ca_file`` replaces the system's CA store (``empty_dir`` stands in for
    its directory of hashed certificates). Certificates are always verified.
    """
    settings = ["http.sslVerify=true", "http.followRedirects=false", "credential.helper="]
    if credentials is not None:
        quoted = shlex.quote(str(credentials))
        settings += [
            f'credential.helper=!f() {{ cat >/dev/null; test "$1" = get && cat {quoted}; }}; f',
            "credential.interactive=false",
        ]
    if ca_file is not None:
        settings += [f"http.sslCAInfo={ca_file}", f"http.sslCAPath={empty_dir}"]
    return settings


def secret_forms(username: str, token: str) -> tuple[str, ...]:
    """What to cut out of git's messages for an HTTPS credential: the token, and the Basic
    authorization value built from it."""
    basic = base64.b64encode(f"{username}:{token}".encode()).decode()
    return tuple(form for form in (token, basic) if form)


_BOILERPLATE = ("hint:", "Please make sure you have the correct access rights", "and the repository exists.")
_REFUSED_CREDENTIALS = (
    "the server refused the credentials: check spec.https.username and that spec.https.token is valid"
    " and unexpired"
)
_HINTS = (
    ("Host key verification failed", "the server did not present a pinned host key (spec.ssh.host_keys)"),
    ("Permission denied (publickey", "the deploy key was refused (is it a deploy key of this repository?)"),
    ("couldn't find remote ref", "no such branch or tag on the remote"),
    ("Authentication failed", _REFUSED_CREDENTIALS),
    ("returned error: 401", _REFUSED_CREDENTIALS),
    (
        "could not read Username",
        "the server wants credentials: give spec.https.username and spec.https.token",
    ),
    (
        "returned error: 403",
        "the token may not read this repository: give it read access (or use another token)",
    ),
    ("returned error: 404", "no repository at this URL, or the token may not see it"),
    ("returned error: 30", "the server redirects, which is not followed: give the final URL in spec.url"),
    (
        "certificate",
        "the server's certificate is not trusted: if it is signed by a private CA, give that CA's PEM"
        " file as spec.https.ca_file",
    ),
    ("Could not resolve host", "check the host name in spec.url and this machine's DNS"),
    ("Failed to connect", "check the URL's host and port and that the server is reachable from here"),
)


def last_words(stderr: bytes, secrets: Sequence[str] = ()) -> str:
    """The lines of git's (and ssh's) stderr worth showing, on one line, with a hint for the usual
    causes; every one of ``secrets`` is replaced by ``***``."""
    text = stderr.decode("utf-8", "replace")
    for secret in secrets:
        text = text.replace(secret, "***")
    lines = [printable(line.strip()) for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_BOILERPLATE)]
    if not lines:
        return ""
    text = "; ".join(lines[-3:])
    hints = list(dict.fromkeys(hint for marker, hint in _HINTS if marker in text))
    if len(text) > _STDERR_MAX:  # git's words are clipped, never the fix
        text = text[: _STDERR_MAX - 1] + "…"
    return f"{text} ({'; '.join(hints)})" if hints else text


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
    secrets: Sequence[str] = field(default=(), repr=False)
    """Values that must never appear in an error (cut out of git's stderr)."""

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
            words = last_words(err, self.secrets)
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
