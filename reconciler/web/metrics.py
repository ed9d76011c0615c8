"""Prometheus metrics, derived from one :class:`~reconciler.web.view.Snapshot` of the status store with
prometheus-client's metric families (names and units by its conventions: ``_seconds``, ``_bytes``,
``_total``, ``_timestamp_seconds``). :func:`exposition` is what ``/metrics`` serves; :func:`write_textfile`
the file node_exporter's textfile collector reads (written by prometheus-client: a temporary file
renamed, so a scrape never sees half of it).

The counters (bytes, backups, the duration summary) are folded from the event log into the store
(:func:`reconciler.web.record.fold`), so they never go down when old history is compacted. A process
restart keeps them; only ``esxi_reconciler_cycles_total`` is the running process's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector

from reconciler.web.view import Snapshot

PREFIX = "esxi_reconciler_"
STATUSES = ("Ready", "Reconciling", "Stalled")


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def _daemon(snap: Snapshot) -> Iterator[Metric]:
    info = InfoMetricFamily(PREFIX + "build", "The running version.")
    info.add_metric([], {"version": snap.version})
    yield info
    beat = _gauge(
        "heartbeat_timestamp_seconds", "When these metrics were produced (a stale text file: a dead daemon)."
    )
    beat.add_metric([], snap.now.timestamp())
    yield beat
    daemon = snap.daemon
    if daemon is None:
        return
    start = _gauge("daemon_start_time_seconds", "When the daemon started.")
    start.add_metric([], daemon.started.timestamp())
    yield start
    loaded = _gauge("config_loaded", "1 when a valid config is in force (the last good one counts).")
    loaded.add_metric([], 1.0 if daemon.config_loaded else 0.0)
    yield loaded
    running = _gauge("cycle_running", "1 while a cycle (observe, plan, apply) runs.")
    running.add_metric([], 1.0 if daemon.cycle_running else 0.0)
    yield running
    cycles = CounterMetricFamily(PREFIX + "cycles", "Cycles started by this process.")
    cycles.add_metric([], float(daemon.cycles))
    yield cycles
    if daemon.last_cycle_finished is not None:
        last = _gauge("last_cycle_timestamp_seconds", "When the last cycle finished.")
        last.add_metric([], daemon.last_cycle_finished.timestamp())
        yield last


def _conditions(snap: Snapshot) -> Iterator[Metric]:
    family = _gauge(
        "condition",
        "One series per object and status: 1 for the object's current status, 0 for the others.",
        ("kind", "name", "status"),
    )
    for condition in snap.conditions:
        for status in STATUSES:
            family.add_metric(
                [condition.kind, condition.name, status], 1.0 if condition.status == status else 0.0
            )
    yield family
    due = _gauge("backup_next_due_timestamp_seconds", "When a VM's next backup is due.", ("host", "vm"))
    for condition in snap.conditions:
        if condition.kind == "vm" and condition.next_due is not None:
            host, _, vm = condition.name.partition("/")
            due.add_metric([host, vm], condition.next_due.timestamp())
    yield due


def _runs(snap: Snapshot) -> Iterator[Metric]:
    labels = ("host", "vm", "policy")
    success = _gauge(
        "backup_last_success_timestamp_seconds", "When a VM's last successful backup finished.", labels
    )
    attempt = _gauge(
        "backup_last_attempt_timestamp_seconds", "When a VM's last backup attempt started.", labels
    )
    failures = _gauge("backup_consecutive_failures", "Failed attempts since the last success.", labels)
    for key, record in sorted(snap.runs.items()):
        kind, _, rest = key.partition("/")
        policy, _, target = rest.partition("/")
        host, _, vm = target.partition("/")
        if kind != "backup" or not vm:
            continue
        values = [host, vm, policy]
        if record.last_succeeded is not None:
            success.add_metric(values, record.last_succeeded.timestamp())
        if record.last_started is not None:
            attempt.add_metric(values, record.last_started.timestamp())
        failures.add_metric(values, float(record.consecutive_failures))
    yield from (success, attempt, failures)

    duration = SummaryMetricFamily(
        PREFIX + "backup_duration_seconds", "How long successful backups took.", labels=list(labels)
    )
    counters = {
        name: CounterMetricFamily(PREFIX + f"backup_{name}", doc, labels=list(labels))
        for name, doc in (
            ("bytes_read", "Bytes read from the hosts' disks by successful backups."),
            (
                "bytes_sent",
                "Bytes sent to the repository (new chunks, before compression) by successful backups.",
            ),
            (
                "bytes_stored",
                "Bytes the repository grew by (compressed, encrypted) through successful backups.",
            ),
        )
    }
    backups = CounterMetricFamily(
        PREFIX + "backups", "Backups that ran, by outcome.", labels=[*labels, "outcome"]
    )
    for c in snap.counters:
        values = [c.host, c.vm, c.policy]
        duration.add_metric(values, count_value=int(c.duration_count), sum_value=c.duration_sum)
        counters["bytes_read"].add_metric(values, c.bytes_read)
        counters["bytes_sent"].add_metric(values, c.bytes_sent)
        counters["bytes_stored"].add_metric(values, c.bytes_stored)
        for outcome, value in (
            ("ok", c.backups_ok),
            ("failed", c.backups_failed),
            ("skipped", c.backups_skipped),
        ):
            backups.add_metric([*values, outcome], value)
    yield duration
    yield from counters.values()
    yield backups
    last = _gauge(
        "backup_last_duration_seconds", "How long a VM's newest backup took (ok or failed).", labels
    )
    for row in sorted(snap.last_backup.values(), key=lambda r: (r.host or "", r.vm or "")):
        if row.seconds is not None:
            last.add_metric([row.host or "", row.vm or "", row.policy or ""], row.seconds)
    yield last


def _inventory(snap: Snapshot) -> Iterator[Metric]:
    inventory = snap.inventory or {}
    reachable = _gauge("host_reachable", "1 when the host answered in the last cycle.", ("host",))
    ds_size = _gauge("datastore_size_bytes", "A datastore's capacity.", ("host", "datastore"))
    ds_free = _gauge("datastore_free_bytes", "A datastore's free space.", ("host", "datastore"))
    for host in inventory.get("hosts", []):
        reachable.add_metric([host["name"]], 1.0 if host["reachable"] else 0.0)
        for ds in host.get("datastores", []):
            ds_size.add_metric([host["name"], ds["name"]], float(ds["capacity_bytes"]))
            ds_free.add_metric([host["name"], ds["name"]], float(ds["free_bytes"]))
    yield from (reachable, ds_size, ds_free)
    vol_size = _gauge(
        "repository_volume_size_bytes", "Size of the volume holding a repository.", ("repository",)
    )
    vol_free = _gauge(
        "repository_volume_free_bytes", "Free space on the volume holding a repository.", ("repository",)
    )
    for repo in inventory.get("repositories", []):
        if repo.get("capacity_bytes") is not None:
            vol_size.add_metric([repo["name"]], float(repo["capacity_bytes"]))
        if repo.get("free_bytes") is not None:
            vol_free.add_metric([repo["name"]], float(repo["free_bytes"]))
    yield from (vol_size, vol_free)


def _repositories(snap: Snapshot) -> Iterator[Metric]:
    count = _gauge("restore_points", "Restore points a VM has in a repository.", ("repository", "host", "vm"))
    newest = _gauge(
        "restore_point_newest_timestamp_seconds",
        "When a VM's newest restore point in a repository was taken (snapshot start).",
        ("repository", "host", "vm"),
    )
    for repo, doc in sorted(snap.points.items()):
        per_vm: dict[tuple[str, str], list[float]] = {}
        for point in doc.get("points") or []:
            started = datetime.fromisoformat(point["started"]).timestamp()
            per_vm.setdefault((point["host"], point["vm"]), []).append(started)
        for (host, vm), times in sorted(per_vm.items()):
            count.add_metric([repo, host, vm], float(len(times)))
            newest.add_metric([repo, host, vm], max(times))
    yield from (count, newest)
    figures = {
        name: _gauge(f"repository_{name}", doc, ("repository",))
        for name, doc in (
            ("stored_bytes", "Bytes the repository's referenced chunks take on its volume (repo stats)."),
            ("logical_bytes", "Bytes restoring every point would write."),
            (
                "unique_bytes",
                "Plaintext bytes of the distinct chunks: after deduplication, before compression.",
            ),
            ("dedup_ratio", "Non-zero data over unique data (higher saves more)."),
            ("compression_ratio", "Unique data over stored bytes."),
        )
    }
    vm_stored = _gauge(
        "repository_vm_stored_bytes",
        "Bytes a VM's points take in a repository (shared chunks counted for each VM).",
        ("repository", "host", "vm"),
    )
    for repo, doc in sorted(snap.usage.items()):
        usage = doc.get("usage") or {}
        total = usage.get("total") or {}
        for name, family in figures.items():
            value = total.get(name)
            if value is not None:
                family.add_metric([repo], float(value))
        for vm in usage.get("vms", []):
            vm_stored.add_metric([repo, vm["host"], vm["vm"]], float(vm["stored_bytes"]))
    yield from figures.values()
    yield vm_stored


class SnapshotCollector:
    """A prometheus-client collector of one snapshot's families."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for part in (_daemon, _conditions, _runs, _inventory, _repositories):
            yield from part(self.snapshot)


def registry(snapshot: Snapshot, *, process: bool = False) -> CollectorRegistry:
    """The families of ``snapshot`` (with ``process``: also the process's CPU, memory, open files)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(snapshot))
    if process:
        ProcessCollector(registry=reg)
    return reg


def exposition(snapshot: Snapshot) -> bytes:
    """The text format ``/metrics`` serves."""
    return generate_latest(registry(snapshot, process=True))


def write_textfile(path: Path, snapshot: Snapshot) -> None:
    """Replace the node_exporter text file (prometheus-client writes a temporary file and renames it)."""
    write_to_textfile(str(path), registry(snapshot))
