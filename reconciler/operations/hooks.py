"""A backup policy's pre and post hooks: commands run on this machine around one VM's backup.

* **pre** hooks run in order inside the VM's lock, before the snapshot is taken. One that fails
  (non-zero exit, killed by its timeout, or not startable) with ``on_failure: fail`` stops the VM's
  backup before any snapshot exists: :class:`HookFailedError` (a :class:`~reconciler.operations.backup`
  VM failure); the remaining pre hooks are not run. ``on_failure: ignore`` logs and goes on.
* **post** hooks run in order once the VM's backup is over and its snapshot removed, whatever the
  outcome: also after a failed or cancelled backup and after a failed pre hook (so a post hook can undo
  what an earlier pre hook did). Each runs even if an earlier one failed. A failing one with
  ``on_failure: fail`` marks the VM's run failed (its restore point, already complete, stays).

Commands are argv lists run without a shell (``[sh, -c, "..."]`` when one is wanted), with stdin from
``/dev/null``, in their own process group that is killed (SIGTERM, then SIGKILL after
:data:`KILL_GRACE` seconds) when the timeout expires. Their environment is ours, without
``$CREDENTIALS_DIRECTORY`` (the hook gets none of our secrets), plus:

=================================  ===============================================================
``ESXI_RECONCILER_HOOK``           ``pre`` or ``post``
``ESXI_RECONCILER_POLICY``         the backup policy's name
``ESXI_RECONCILER_HOST``           the host's name in the config
``ESXI_RECONCILER_VM``             the VM's display name
``ESXI_RECONCILER_STATUS``         post only: ``success`` or ``failure``
``ESXI_RECONCILER_POINT_ID``       post only: the new restore point's id (empty on failure)
``ESXI_RECONCILER_ERROR``          post only: why the backup failed (empty on success)
=================================  ===============================================================

The log records the command, exit code, duration and the last lines of stderr (at most
:data:`TAIL_BYTES`); the log's own redaction applies to that text. Hooks never receive a secret from us.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import IO, Literal

import structlog

from reconciler.config.model import Hook, HookFailure, Hooks

log = structlog.get_logger(__name__)

ENV_PREFIX = "ESXI_RECONCILER_"
TAIL_BYTES = 2048
"""How much of the end of a hook's stderr (and stdout) is kept for the log and the error message."""
KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL for a hook that outlived its timeout."""
_HIDDEN_ENV = ("CREDENTIALS_DIRECTORY",)

Phase = Literal["pre", "post"]


@dataclass(frozen=True)
class HookOutcome:
    """What one run of a command did. ``exit_code`` is None when it timed out or could not start."""

    exit_code: int | None
    seconds: float
    stderr_tail: str = ""
    stdout_tail: str = ""
    timed_out: bool = False
    start_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.start_error is None

    def describe(self) -> str:
        """``exit 3``, ``killed after timeout of 60s`` or ``could not start: ...``."""
        if self.start_error is not None:
            return f"could not start: {self.start_error}"
        if self.timed_out:
            return f"killed after its timeout of {self.seconds:.0f}s"
        if self.exit_code is not None and self.exit_code < 0:
            return f"killed by signal {-self.exit_code}"
        return f"exit {self.exit_code}"


Runner = Callable[[Sequence[str], Mapping[str, str], float], HookOutcome]
"""Runs ``argv`` with the environment and a timeout in seconds (a seam for tests)."""


class HookFailedError(Exception):
    """A pre hook with ``on_failure: fail`` failed: the VM is not backed up."""


class _Tail:
    """Reads a pipe to its end, keeping only the last ``limit`` bytes (bounded memory)."""

    def __init__(self, pipe: IO[bytes], limit: int = TAIL_BYTES) -> None:
        self.data = b""
        self._pipe = pipe
        self._limit = limit
        self._thread = threading.Thread(target=self._run, name="hook-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._pipe:
            while chunk := os.read(self._pipe.fileno(), 65536):
                self.data = (self.data + chunk)[-self._limit :]

    def text(self, timeout: float = 2.0) -> str:
        self._thread.join(timeout)  # a grandchild may keep the pipe open: do not wait for it forever
        return self.data.decode("utf-8", "replace").strip()


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(
    argv: Sequence[str], env: Mapping[str, str], timeout: float, *, grace: float = KILL_GRACE
) -> HookOutcome:
    """Run ``argv`` (no shell) and wait at most ``timeout`` seconds; its process group is killed after."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return HookOutcome(None, time.monotonic() - started, start_error=exc.strerror or str(exc))
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Tail(proc.stdout), _Tail(proc.stderr)
    timed_out = False
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        code = None
        _kill_group(proc, grace)
    except BaseException:  # SIGTERM/Ctrl-C of the whole run: do not leave the hook behind
        _kill_group(proc, grace)
        raise
    return HookOutcome(
        code,
        time.monotonic() - started,
        stderr_tail=err.text(),
        stdout_tail=out.text(),
        timed_out=timed_out,
    )


def _tail_lines(text: str, lines: int = 5) -> str:
    return "\n".join(text.splitlines()[-lines:])


class VmHooks:
    """The hooks of one VM's backup: call :meth:`pre` before the snapshot and :meth:`post` after."""

    def __init__(
        self, hooks: Hooks, *, policy: str, host: str, vm: str, runner: Runner = run_command
    ) -> None:
        self.hooks = hooks
        self.policy = policy
        self.host = host
        self.vm = vm
        self.runner = runner
        self.log = log.bind(policy=policy, host=host, vm=vm)

    def environment(self, phase: Phase, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _HIDDEN_ENV}
        env.update(
            {
                f"{ENV_PREFIX}HOOK": phase,
                f"{ENV_PREFIX}POLICY": self.policy,
                f"{ENV_PREFIX}HOST": self.host,
                f"{ENV_PREFIX}VM": self.vm,
            }
        )
        env.update(extra or {})
        return env

    def _run(self, phase: Phase, number: int, hook: Hook, env: Mapping[str, str]) -> HookOutcome:
        timeout = hook.timeout.total_seconds()
        self.log.info("hook.start", phase=phase, hook=number, command=list(hook.command), timeout=timeout)
        outcome = self.runner(hook.command, env, timeout)
        fields = {
            "phase": phase,
            "hook": number,
            "command": list(hook.command),
            "exit_code": outcome.exit_code,
            "seconds": round(outcome.seconds, 3),
        }
        if outcome.ok:
            self.log.info("hook.done", **fields)
            if outcome.stdout_tail:
                self.log.debug("hook.stdout", phase=phase, hook=number, stdout_tail=outcome.stdout_tail)
        else:
            level = self.log.warning if hook.on_failure is HookFailure.IGNORE else self.log.error
            level(
                "hook.failed",
                **fields,
                result=outcome.describe(),
                timed_out=outcome.timed_out,
                on_failure=hook.on_failure.value,
                stderr_tail=outcome.stderr_tail,
            )
        return outcome

    def _message(self, phase: Phase, number: int, hook: Hook, outcome: HookOutcome) -> str:
        program = PurePath(hook.command[0]).name
        text = f"{phase} hook {number} ({program}) failed: {outcome.describe()}"
        tail = _tail_lines(outcome.stderr_tail, 3)
        return f"{text}: {tail}" if tail else text

    def pre(self) -> None:
        """Run the pre hooks in order; raise :class:`HookFailedError` at the first failing ``fail`` one."""
        env = self.environment("pre")
        for number, hook in enumerate(self.hooks.pre, 1):
            outcome = self._run("pre", number, hook, env)
            if not outcome.ok and hook.on_failure is HookFailure.FAIL:
                raise HookFailedError(self._message("pre", number, hook, outcome) + "; no snapshot taken")

    def post(self, *, ok: bool, point_id: str | None, error: str | None = None) -> str | None:
        """Run every post hook; the message of the first failing ``fail`` one, else None."""
        env = self.environment(
            "post",
            {
                f"{ENV_PREFIX}STATUS": "success" if ok else "failure",
                f"{ENV_PREFIX}POINT_ID": point_id or "",
                f"{ENV_PREFIX}ERROR": "" if ok else (error or "failed"),
            },
        )
        first: str | None = None
        for number, hook in enumerate(self.hooks.post, 1):
            outcome = self._run("post", number, hook, env)
            if not outcome.ok and hook.on_failure is HookFailure.FAIL and first is None:
                first = self._message("post", number, hook, outcome)
        return first
