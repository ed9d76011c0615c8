"""Pre/post hooks of a backup policy (:mod:`reconciler.operations.hooks`): order, environment, failures,
timeouts, logging — with a fake runner and with tiny real programs."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import structlog

from reconciler.config.model import Hook, HookFailure, Hooks
from reconciler.operations.hooks import HookFailedError, HookOutcome, VmHooks, run_command

PY = sys.executable


def hook(*command: str, timeout: float = 60, on_failure: str = "fail") -> Hook:
    return Hook(tuple(command), timedelta(seconds=timeout), HookFailure(on_failure))


class FakeRunner:
    """Records every call; answers from ``outcomes`` by program name (default: success)."""

    def __init__(self, outcomes: Mapping[str, HookOutcome] | None = None) -> None:
        self.outcomes = dict(outcomes or {})
        self.calls: list[tuple[tuple[str, ...], dict[str, str], float]] = []

    def __call__(self, argv: Sequence[str], env: Mapping[str, str], timeout: float) -> HookOutcome:
        self.calls.append((tuple(argv), dict(env), timeout))
        return self.outcomes.get(argv[0], HookOutcome(0, 0.01))

    @property
    def programs(self) -> list[str]:
        return [argv[0] for argv, _, _ in self.calls]


def vm_hooks(hooks: Hooks, runner: FakeRunner) -> VmHooks:
    return VmHooks(hooks, policy="web-daily", host="esxi1", vm="db 01", runner=runner)


def test_pre_hooks_run_in_order_with_their_timeout_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/esxi-reconciler.service")
    monkeypatch.setenv("KEEP_ME", "1")
    runner = FakeRunner()
    vm_hooks(Hooks(pre=(hook("a", "x y", timeout=90), hook("b")), post=()), runner).pre()
    assert runner.programs == ["a", "b"]
    argv, env, timeout = runner.calls[0]
    assert argv == ("a", "x y") and timeout == 90
    assert env["ESXI_RECONCILER_HOOK"] == "pre"
    assert env["ESXI_RECONCILER_POLICY"] == "web-daily"
    assert env["ESXI_RECONCILER_HOST"] == "esxi1"
    assert env["ESXI_RECONCILER_VM"] == "db 01"
    assert "ESXI_RECONCILER_STATUS" not in env
    assert env["KEEP_ME"] == "1"
    assert "CREDENTIALS_DIRECTORY" not in env  # the hook gets none of our secrets


def test_failing_pre_hook_stops_at_the_first_failure_with_exit_code_and_stderr() -> None:
    runner = FakeRunner({"b": HookOutcome(3, 0.2, stderr_tail="line 1\ndatabase is busy")})
    hooks = Hooks(pre=(hook("a"), hook("/usr/local/bin/b"), hook("c")), post=())
    runner.outcomes["/usr/local/bin/b"] = runner.outcomes.pop("b")
    with pytest.raises(HookFailedError) as info:
        vm_hooks(hooks, runner).pre()
    message = str(info.value)
    assert message == "pre hook 2 (b) failed: exit 3: line 1\ndatabase is busy; no snapshot taken"
    assert runner.programs == ["a", "/usr/local/bin/b"]  # c is not run


def test_ignored_pre_hook_failure_goes_on() -> None:
    runner = FakeRunner({"a": HookOutcome(1, 0.1, stderr_tail="nope")})
    vm_hooks(Hooks(pre=(hook("a", on_failure="ignore"), hook("b")), post=()), runner).pre()
    assert runner.programs == ["a", "b"]


def test_post_hooks_all_run_and_say_how_the_backup_went() -> None:
    runner = FakeRunner({"a": HookOutcome(None, 5.0, timed_out=True), "b": HookOutcome(2, 0.1)})
    hooks = Hooks(pre=(), post=(hook("a", timeout=5), hook("b"), hook("c")))
    error = vm_hooks(hooks, runner).post(ok=False, point_id=None, error="VM 'db 01' has snapshots")
    assert runner.programs == ["a", "b", "c"]  # a failing post hook does not stop the others
    assert error == "post hook 1 (a) failed: killed after its timeout of 5s"
    env = runner.calls[0][1]
    assert env["ESXI_RECONCILER_HOOK"] == "post"
    assert env["ESXI_RECONCILER_STATUS"] == "failure"
    assert env["ESXI_RECONCILER_POINT_ID"] == ""
    assert env["ESXI_RECONCILER_ERROR"] == "VM 'db 01' has snapshots"

    runner = FakeRunner()
    assert vm_hooks(hooks, runner).post(ok=True, point_id="20261126T084500Z-abcd") is None
    env = runner.calls[0][1]
    assert env["ESXI_RECONCILER_STATUS"] == "success"
    assert env["ESXI_RECONCILER_POINT_ID"] == "20261126T084500Z-abcd"
    assert env["ESXI_RECONCILER_ERROR"] == ""


def test_ignored_post_hook_failure_is_not_an_error() -> None:
    runner = FakeRunner({"a": HookOutcome(1, 0.1)})
    hooks = Hooks(pre=(), post=(hook("a", on_failure="ignore"),))
    assert vm_hooks(hooks, runner).post(ok=True, point_id="p") is None


def test_no_hooks_run_nothing() -> None:
    runner = FakeRunner()
    h = vm_hooks(Hooks(pre=(), post=()), runner)
    h.pre()
    assert h.post(ok=True, point_id="p") is None
    assert runner.calls == []


def test_failures_are_logged_with_exit_code_and_stderr_tail() -> None:
    runner = FakeRunner({"a": HookOutcome(4, 0.1, stderr_tail="x" * 10 + "\nlast words")})
    with structlog.testing.capture_logs() as logs, pytest.raises(HookFailedError):
        vm_hooks(Hooks(pre=(hook("a", "--flag"),), post=()), runner).pre()
    (failed,) = [e for e in logs if e["event"] == "hook.failed"]
    assert failed["log_level"] == "error"
    assert failed["exit_code"] == 4
    assert failed["command"] == ["a", "--flag"]
    assert failed["stderr_tail"].endswith("last words")
    assert failed["vm"] == "db 01" and failed["phase"] == "pre"


# -- real programs -------------------------------------------------------------------------------------


def test_run_command_success_exit_code_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    script = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    res = run_command([PY, "-c", script], {"ESXI_RECONCILER_VM": 'ファイル鯖 "q" $(x)'}, 30)
    assert res.ok and res.exit_code == 0
    assert json.loads(out.read_text())["ESXI_RECONCILER_VM"] == 'ファイル鯖 "q" $(x)'

    res = run_command(
        [PY, "-c", "import sys; sys.stderr.write('a\\n' * 5000 + 'the end'); sys.exit(7)"], {}, 30
    )
    assert not res.ok and res.exit_code == 7 and res.describe() == "exit 7"
    assert res.stderr_tail.endswith("the end") and len(res.stderr_tail) <= 2048


def test_run_command_no_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    res = run_command([PY, "-c", "import sys; print(sys.argv[1])", f"$(touch {marker})"], {}, 30)
    assert res.ok and res.stdout_tail == f"$(touch {marker})"
    assert not marker.exists()


def test_run_command_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # the hook starts a grandchild that would outlive it; both are killed
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(600)\n"
    )
    # the timeout leaves a loaded machine time to start two interpreters and write the pid file
    res = run_command([PY, "-c", script], {}, 5.0, grace=1.0)
    assert res.timed_out and not res.ok and res.exit_code is None
    assert "killed after its timeout" in res.describe()
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 60
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child), "the hook's grandchild survived its timeout"


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a killed orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return not stat.rsplit(") ", 1)[-1].startswith("Z")


def test_run_command_missing_program() -> None:
    res = run_command(["/nonexistent/hook-program"], {}, 5)
    assert not res.ok and res.exit_code is None
    assert res.describe().startswith("could not start: ")


def test_real_pre_hook_failure_through_vm_hooks() -> None:
    hooks = Hooks(pre=(hook(PY, "-c", "import sys; sys.stderr.write('not ready'); sys.exit(2)"),), post=())
    with pytest.raises(HookFailedError, match=r"pre hook 1 \(python[0-9.]*\) failed: exit 2: not ready"):
        VmHooks(hooks, policy="p", host="h", vm="v").pre()
