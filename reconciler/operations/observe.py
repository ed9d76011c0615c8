"""Observe: read every configured host and repository once, into an :class:`ObservedState`.

The planner is pure; this is the I/O in front of it. Hosts are read in parallel, each within a bounded
time, and a host that fails or hangs becomes ``HostObservation(reachable=False, error=...)`` instead of
an exception: one host down must not stop the plan for the others. Repositories are read under a
*shared* lock (a backup may write at the same time; a garbage collection may not delete underneath us).

:func:`load_history` reads the run history from the status store. (The fingerprint of the observed
facts a saved plan depends on is pure: :mod:`reconciler.planning.fingerprint`.)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import structlog

from reconciler.config.model import DesiredState, Host, LocalBackendConfig, RepositoryConfig
from reconciler.operations.failures import explain
from reconciler.operations.hosts import HostFactory, connect
from reconciler.operations.ports import HostReader
from reconciler.operations.repositories import open_repository
from reconciler.operations.restore import unfinished_overwrites
from reconciler.planning.observed import HostObservation, ObservedState, RepositoryObservation, RunRecord
from reconciler.repository import Repository, garbage_signs

log = structlog.get_logger(__name__)

HOST_TIMEOUT = 120.0
"""Seconds one host may take to answer (licence, inventory, datastores) before it counts as unreachable."""

_ERROR_MAX = 300


RepoOpener = Callable[[RepositoryConfig], Repository]


def _error_text(exc: BaseException, address: str | None = None) -> str:
    """A one-line reason for people (exception messages of this code base never hold secret values):
    the words of :func:`reconciler.operations.failures.explain` for an expected failure."""
    explained = explain(exc, address=address)
    if explained is not None:
        return explained.message
    text = " ".join(str(exc).split())
    if len(text) > _ERROR_MAX:  # API faults can carry whole object dumps
        text = text[: _ERROR_MAX - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _observe_host(config: Host, factory: HostFactory[HostReader]) -> HostObservation:
    host = factory(config)
    try:
        license = host.license
        vms = tuple(host.list_vms())
        datastores = tuple(host.datastores())
        try:
            overwrites = unfinished_overwrites(host, config.name, vms, [d.name for d in datastores])
        except Exception as exc:  # noqa: BLE001  a journal that cannot be looked for must not hide the host
            log.warning("observe.overwrite_journals_unreadable", host=config.name, error=_error_text(exc))
            overwrites = ()
        return HostObservation(
            name=config.name,
            reachable=True,
            license=license,
            ssh_enabled=config.ssh.enabled,
            vms=vms,
            datastores=datastores,
            snapshot_prefix=host.prefix,
            unfinished_overwrites=overwrites,
        )
    finally:
        host.close()


def _observe_hosts(
    hosts: Sequence[Host], factory: HostFactory[HostReader], timeout: float
) -> dict[str, HostObservation]:
    results: dict[str, HostObservation] = {}
    lock = threading.Lock()

    def work(config: Host) -> None:
        started = time.monotonic()
        try:
            observation = _observe_host(config, factory)
        except Exception as exc:  # noqa: BLE001  any failure is an observation of this host, never a crash
            observation = HostObservation(
                name=config.name,
                reachable=False,
                error=_error_text(exc, f"{config.address}:{config.api.port}"),
                ssh_enabled=config.ssh.enabled,
            )
            log.warning("observe.host_unreachable", host=config.name, error=observation.error)
        else:
            log.debug(
                "observe.host",
                host=config.name,
                vms=len(observation.vms),
                seconds=round(time.monotonic() - started, 3),
            )
        with lock:
            results.setdefault(config.name, observation)

    # Daemon threads: a host that hangs past its time must not keep the process alive on exit.
    threads = [threading.Thread(target=work, args=(h,), name=f"observe-{h.name}", daemon=True) for h in hosts]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        for config in hosts:
            if config.name not in results:
                log.warning("observe.host_timeout", host=config.name, seconds=timeout)
                results[config.name] = HostObservation(
                    name=config.name,
                    reachable=False,
                    error=f"no answer within {timeout:g} s",
                    ssh_enabled=config.ssh.enabled,
                )
        return dict(results)


def _observe_repository(config: RepositoryConfig, opener: RepoOpener) -> RepositoryObservation:
    try:
        repo = opener(config)
        with repo.lock(exclusive=False, purpose="observe") as lock:
            points = repo.list_points()
            signs = garbage_signs(repo, points, lock)
    except Exception as exc:  # noqa: BLE001  unreadable repository: an observation, the plan still covers the rest
        error = _error_text(exc)
        log.warning("observe.repository_unreachable", repository=config.name, error=error)
        return RepositoryObservation(name=config.name, reachable=False, error=error)
    log.debug(
        "observe.repository",
        repository=config.name,
        points=len(points),
        gc_interrupted=signs.gc_interrupted.isoformat() if signs.gc_interrupted else None,
        unreferenced_indexes=signs.unreferenced_indexes,
    )
    capacity, free = _volume_space(config)
    return RepositoryObservation(
        name=config.name,
        reachable=True,
        points=tuple(points),
        gc_interrupted=signs.gc_interrupted,
        unreferenced_indexes=signs.unreferenced_indexes,
        capacity_bytes=capacity,
        free_bytes=free,
    )


def _volume_space(config: RepositoryConfig) -> tuple[int | None, int | None]:
    """Size and free space of the repository's volume (for the low-space notification), or Nones (an S3
    bucket has no volume)."""
    if not isinstance(config.backend, LocalBackendConfig):
        return None, None
    try:
        vfs = os.statvfs(str(config.backend.path))
    except OSError:
        return None, None
    return vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize


def observe_repositories(
    repositories: Iterable[RepositoryConfig], *, repo_opener: RepoOpener = open_repository
) -> dict[str, RepositoryObservation]:
    """Each repository's restore points (under a shared lock), or why it cannot be read: what
    :func:`observe` reads of them, and all the approval check of a proposed config needs."""
    return {config.name: _observe_repository(config, repo_opener) for config in repositories}


def observe(
    desired: DesiredState,
    *,
    now: datetime,
    history: Mapping[str, RunRecord],
    host_factory: HostFactory[HostReader] = connect,
    repo_opener: RepoOpener = open_repository,
    host_timeout: float = HOST_TIMEOUT,
) -> ObservedState:
    """Observe every host and repository of ``desired``; ``now`` becomes the observation's time."""
    results: dict[str, HostObservation] = {}
    hosts = list(desired.hosts.values())
    # Hosts answer over the network in parallel while the (local) repositories are read here.
    host_thread = threading.Thread(
        target=lambda: results.update(_observe_hosts(hosts, host_factory, host_timeout)),
        name="observe-hosts",
        daemon=True,
    )
    host_thread.start()
    repositories = observe_repositories(desired.repositories.values(), repo_opener=repo_opener)
    host_thread.join()
    return ObservedState(
        time=now,
        hosts={name: results[name] for name in desired.hosts},
        repositories=repositories,
        history=history,
    )


# -- history --------------------------------------------------------------------------------------


def load_history(state_dir: Path, revision: str | None = None) -> dict[str, RunRecord]:
    """The run history of ``state_dir`` (the status store), read-only; empty when there is none yet.

    ``revision``: the current config revision (a terminal failure recorded under another revision no
    longer holds its job back). Without history every job looks as if it never ran, which still plans
    correctly from the repositories' restore points.
    """
    from reconciler.status.store import read_history  # status sits above the engine's types

    return read_history(state_dir, revision)
