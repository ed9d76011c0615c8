"""The fingerprint of a plan's inputs: what ``apply FILE`` checks a saved plan against.

Pure: a SHA-256 over the config revision and the observed facts the plan depends on, so a saved plan
whose hosts or repositories changed since is refused instead of carried out.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from reconciler.config.model import DesiredState
from reconciler.facts.inventory import VmInfo
from reconciler.planning.observed import ObservedState, RepositoryObservation


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _vm_facts(vm: VmInfo) -> dict[str, Any]:
    return {
        "name": vm.name,
        "vmid": vm.vmid,
        "power": vm.power_state,
        "cbt": vm.cbt_enabled,
        "snapshots": sorted([s.id, s.name] for s in vm.snapshots),
        "disks": sorted([d.key, d.capacity] for d in vm.disks),
    }


def _repository_facts(repo: RepositoryObservation) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "reachable": repo.reachable,
        "points": sorted(f"{p.id} {p.status}{' protected' if p.protected else ''}" for p in repo.points),
    }
    # only when present: a repository without garbage keeps the fingerprint it always had
    if repo.gc_interrupted is not None:
        facts["gc_interrupted"] = repo.gc_interrupted.isoformat()
    if repo.unreferenced_indexes:
        facts["unreferenced_indexes"] = repo.unreferenced_indexes
    return facts


def fingerprint(desired: DesiredState, observed: ObservedState) -> str:
    """SHA-256 (hex) over the observed facts a plan depends on.

    Left out on purpose: the time, error texts, and datastore free space (it moves with every guest
    write, so a saved plan would always look stale). Schedules depend on the time, but a saved plan's
    actions stay valid when applied a little later.
    """
    doc: dict[str, Any] = {
        "revision": desired.revision.id,
        "hosts": {
            name: {
                "reachable": host.reachable,
                "license": host.license,
                "vms": sorted((_vm_facts(vm) for vm in host.vms), key=lambda v: (v["vmid"], v["name"])),
            }
            for name, host in sorted(observed.hosts.items())
        },
        "repositories": {
            name: _repository_facts(repo) for name, repo in sorted(observed.repositories.items())
        },
        "history": {
            key: [_iso(record.retry_after), _iso(record.last_started)]
            for key, record in sorted(observed.history.items())
        },
    }
    text = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
