"""The status page: one server-rendered HTML document from a :class:`~reconciler.web.view.Snapshot`.

Pure (its own import contract, ``web-page``): no I/O, so what a person sees is tested with plain values.
No script and no external asset (inline CSS and SVG: it works offline on a NAS); a single column that
fits a phone (tables scroll sideways inside their box). Everything from outside — VM, host, datastore
and policy names, messages, errors — goes through :func:`html.escape` (quotes included) after control
characters are made visible by :func:`reconciler.printable.printable`, so a VM named ``<script>`` or
holding a newline is shown as written and never becomes markup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from html import escape
from typing import Any

from reconciler.printable import printable
from reconciler.units import human_size
from reconciler.web.charts import Series, chart
from reconciler.web.view import EventRow, Snapshot

CSS = """
:root{color-scheme:light dark;--bg:#f8fafc;--fg:#0f172a;--muted:#64748b;--card:#fff;--line:#e2e8f0;
--ok:#15803d;--warn:#b45309;--bad:#b91c1c}
@media (prefers-color-scheme:dark){:root{--bg:#0f172a;--fg:#e2e8f0;--muted:#94a3b8;--card:#1e293b;
--line:#334155;--ok:#4ade80;--warn:#fbbf24;--bad:#f87171}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);
color:var(--fg)}
header,main{max-width:1100px;margin:0 auto;padding:12px}
header h1{font-size:1.3rem;margin:0 0 4px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px;margin:12px 0}
h2{font-size:1.1rem;margin:0 0 8px}
h3{font-size:1rem;margin:12px 0 6px;overflow-wrap:anywhere}
.wrap{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
td.name{overflow-wrap:anywhere;min-width:8em}
th{color:var(--muted);font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap}
.badge{display:inline-block;padding:0 6px;border-radius:4px;font-size:.8rem;font-weight:600;
border:1px solid currentColor;white-space:nowrap}
.Ready,.ok{color:var(--ok)}.Reconciling,.warning,.skipped{color:var(--warn)}.Stalled,.failed{color:var(--bad)}
.muted,.info{color:var(--muted)}
pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:.85rem;margin:0}
.chart{width:100%;height:auto;max-height:260px}
.chart .grid{stroke:var(--line)}.chart .axis{fill:var(--muted);font-size:11px}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:.8rem;overflow-wrap:anywhere}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.summary{display:flex;flex-wrap:wrap;gap:4px 16px}.summary span{overflow-wrap:anywhere;min-width:0}
details summary{cursor:pointer;overflow-wrap:anywhere}
"""


def text(value: object) -> str:
    """Text from outside, safe inside an element or a quoted attribute."""
    return escape(printable(str(value)), quote=True)


def when(value: datetime | str | None, now: datetime) -> str:
    """A time for people: ``2026-12-07 04:30Z (3 h ago)``, or a dash."""
    if value is None:
        return '<span class="muted">–</span>'
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    delta = (now - moment).total_seconds()
    ahead = delta < 0
    seconds = abs(delta)
    if seconds < 90:
        rel = f"{int(seconds)} s"
    elif seconds < 5400:
        rel = f"{round(seconds / 60)} min"
    elif seconds < 172800:
        rel = f"{round(seconds / 3600)} h"
    else:
        rel = f"{round(seconds / 86400)} d"
    rel = f"in {rel}" if ahead else f"{rel} ago"
    stamp = f'<time datetime="{moment.isoformat()}">{moment:%Y-%m-%d %H:%M}Z</time>'
    return f'{stamp} <span class="muted">({rel})</span>'


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def size(value: Any) -> str:
    return human_size(int(value)) if isinstance(value, int | float) else "–"


def ratio(value: Any) -> str:
    return f"{value:.2f}×" if isinstance(value, int | float) else "–"


def badge(status: str) -> str:
    return f'<span class="badge {text(status)}">{text(status)}</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else (' class="name"' if i == 0 else "")
            cells.append(f"<td{cls}>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return '<p class="muted">None.</p>'
    return (
        f'<div class="wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


# -- sections ----------------------------------------------------------------------------------------


def _header(snap: Snapshot) -> str:
    stalled = [c for c in snap.conditions if c.status == "Stalled"]
    overall = (
        "Stalled"
        if stalled
        else ("Reconciling" if any(c.status == "Reconciling" for c in snap.conditions) else "Ready")
    )
    daemon = snap.daemon
    facts = [f"esxi-reconciler {text(snap.version)}", f"page {when(snap.now, snap.now)}"]
    if daemon is not None:
        facts.append(f"config {text(daemon.revision or 'none loaded')}")
        if daemon.cycle_running:
            facts.append(f"cycle {daemon.cycles} running since {when(daemon.last_cycle_started, snap.now)}")
        elif daemon.last_cycle_finished is not None:
            facts.append(f"last cycle {when(daemon.last_cycle_finished, snap.now)}")
        else:
            facts.append("no cycle yet")
    summary = "".join(f"<span>{f}</span>" for f in facts)
    count = f" — {len(stalled)} need attention" if stalled else ""
    return (
        f"<header><h1>ESXi backups {badge(overall)}{text(count)}</h1>"
        f'<div class="summary muted">{summary}</div></header>'
    )


def _attention(snap: Snapshot) -> str:
    rows = [
        (
            text(f"{c.kind} {c.name}"),
            badge(c.status),
            text(c.reason),
            text(c.message),
            when(c.updated, snap.now),
        )
        for c in snap.conditions
        if c.status != "Ready"
    ]
    return (
        "<section><h2>Needs attention</h2>"
        + _table(("Object", "Status", "Reason", "Message", "Since"), rows)
        + "</section>"
    )


def _points_by_vm(snap: Snapshot) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for repo, doc in snap.points.items():
        for point in doc.get("points") or []:
            out.setdefault((point["host"], point["vm"]), []).append({**point, "repository": repo})
    return out


def _hosts(snap: Snapshot) -> str:
    inventory = snap.inventory or {}
    points = _points_by_vm(snap)
    parts = ["<section><h2>Hosts and VMs</h2>"]
    if not inventory.get("hosts"):
        parts.append('<p class="muted">No cycle has observed the hosts yet.</p>')
    for host in inventory.get("hosts", []):
        hc = snap.condition("host", host["name"])
        status = badge(hc.status) if hc else ""
        licence = f' <span class="muted">{text(host.get("license") or "")}</span>'
        parts.append(f"<h3>{text(host['name'])} {status}{licence}</h3>")
        if not host["reachable"]:
            parts.append(f'<p class="failed">{text(host.get("error") or "unreachable")}</p>')
        rows = []
        # An unreachable host lists no VMs: those the daemon protects there are still known by their
        # conditions (from the run history), so they stay on the page.
        seen = {vm["name"] for vm in host.get("vms", [])}
        vms = list(host.get("vms", [])) + [
            {"name": name, "protected_by": []}
            for c in snap.conditions
            if c.kind == "vm"
            and c.name.startswith(host["name"] + "/")
            and (name := c.name.split("/", 1)[1]) not in seen
        ]
        for vm in vms:
            full = f"{host['name']}/{vm['name']}"
            vc = snap.condition("vm", full)
            last = snap.last_backup.get(full)
            last_text = "–"
            if last is not None:
                outcome = f'<span class="{text(last.outcome)}">{text(last.outcome)}</span>'
                last_text = f"{when(last.time, snap.now)} {outcome} {duration(last.seconds)}"
            success = vc.last_success if vc else None
            mine = points.get((host["name"], vm["name"]), [])
            rows.append(
                (
                    text(vm["name"]),
                    badge(vc.status) + f' <span class="muted">{text(vc.reason)}</span>'
                    if vc
                    else '<span class="muted">not protected</span>',
                    when(success, snap.now) if success else "–",
                    last_text,
                    when(vc.next_due, snap.now) if vc and vc.next_due else "–",
                    str(len(mine)),
                    text(", ".join(vm.get("protected_by", [])) or "–"),
                )
            )
        parts.append(
            _table(
                ("VM", "Condition", "Last success", "Last backup", "Next due", "Points", "Policies"),
                rows,
                (5,),
            )
        )
        datastores = [
            (text(d["name"]), size(d["capacity_bytes"]), size(d["free_bytes"]))
            for d in host.get("datastores", [])
        ]
        if datastores:
            parts.append(
                "<details><summary>Datastores</summary>"
                + _table(("Datastore", "Size", "Free"), datastores, (1, 2))
                + "</details>"
            )
    parts.append("</section>")
    return "".join(parts)


def _repositories(snap: Snapshot) -> str:
    parts = ["<section><h2>Repositories and restore points</h2>"]
    volumes = {r["name"]: r for r in (snap.inventory or {}).get("repositories", [])}
    names = sorted(set(snap.points) | set(snap.usage) | set(volumes))
    if not names:
        parts.append('<p class="muted">No repository has been read yet.</p>')
    for name in names:
        rc = snap.condition("repository", name)
        parts.append(f"<h3>{text(name)} {badge(rc.status) if rc else ''}</h3>")
        usage = (snap.usage.get(name) or {}).get("usage") or {}
        total = usage.get("total") or {}
        volume = volumes.get(name) or {}
        facts = [
            f"{total.get('points', 0)} points",
            f"stored {size(total.get('stored_bytes'))} of {size(total.get('logical_bytes'))} logical",
            f"dedup {ratio(total.get('dedup_ratio'))}",
            f"compression {ratio(total.get('compression_ratio'))}",
            f"saved {ratio(total.get('reduction_ratio'))} overall",
        ]
        if volume.get("free_bytes") is not None:
            facts.append(f"volume {size(volume['free_bytes'])} free of {size(volume.get('capacity_bytes'))}")
        parts.append('<div class="summary">' + "".join(f"<span>{f}</span>" for f in facts) + "</div>")
        doc = snap.points.get(name) or {}
        if doc and not doc.get("reachable", True):
            parts.append(f'<p class="failed">{text(doc.get("error") or "unreadable")}</p>')
        by_vm: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for point in doc.get("points") or []:
            by_vm.setdefault((point["host"], point["vm"]), []).append(point)
        vm_usage = {(v["host"], v["vm"]): v for v in usage.get("vms", [])}
        for (host, vm), points in sorted(by_vm.items()):
            figures = vm_usage.get((host, vm)) or {}
            head = (
                f'{text(vm)} <span class="muted">on {text(host)} · {len(points)} points · stored'
                f" {size(figures.get('stored_bytes'))} of {size(figures.get('logical_bytes'))} · dedup"
                f" {ratio(figures.get('dedup_ratio'))}</span>"
            )
            rows = [
                (
                    text(p["id"]),
                    when(p["started"], snap.now),
                    text(p["mode"]),
                    f'<span class="{"ok" if p["status"] == "success" else "warning"}">'
                    f"{text(p['status'])}</span>" + (" 🔒" if p.get("protected") else ""),
                    size(p["logical_bytes"]),
                    size(p["read_bytes"]),
                    size(p["stored_bytes"]),
                )
                for p in sorted(points, key=lambda p: p["started"], reverse=True)
            ]
            parts.append(
                f"<details><summary>{head}</summary>"
                + _table(("Point", "Taken", "Mode", "Status", "Size", "Read", "Added"), rows, (4, 5, 6))
                + "</details>"
            )
    parts.append("</section>")
    return "".join(parts)


def growth(
    backups: Sequence[EventRow], repository: str, current: float | None, now: datetime
) -> list[tuple[datetime, float]]:
    """A repository's stored bytes over time: backwards from ``current`` (its last counted size; without
    one, from zero forwards) by what each backup stored and each garbage collection freed."""
    mine = [
        e for e in backups if e.repository == repository and e.outcome == "ok" and e.kind in ("backup", "gc")
    ]
    deltas = []
    for event in mine:
        key = "bytes_stored" if event.kind == "backup" else "bytes_freed"
        value = event.detail.get(key)
        amount = float(value) if isinstance(value, int | float) else 0.0
        deltas.append((event.time, amount if event.kind == "backup" else -amount))
    end = current if current is not None else sum(d for _, d in deltas)
    out: list[tuple[datetime, float]] = []
    remaining = end
    for moment, delta in reversed(deltas):
        out.append((moment, remaining))
        remaining -= delta
    out.reverse()
    if deltas:
        out.insert(0, (deltas[0][0] - timedelta(seconds=1), max(0.0, remaining)))
    out.append((now, end))
    return out


def _charts(snap: Snapshot, days: int) -> str:
    start = snap.now - timedelta(days=days)
    durations: dict[str, list[tuple[datetime, float]]] = {}
    for e in snap.backups:
        if e.kind == "backup" and e.outcome == "ok" and e.seconds is not None:
            durations.setdefault(f"{e.host}/{e.vm}", []).append((e.time, e.seconds))
    firsts = [min(t for t, _ in pts) for pts in durations.values()]
    if firsts:
        start = max(start, min(firsts) - timedelta(hours=1))
    duration_chart = chart(
        [Series(name, pts) for name, pts in sorted(durations.items())],
        start=start,
        end=snap.now,
        label=f"Backup durations, last {days} days",
        value_text=duration,
        lines=True,
    )
    repos = sorted({e.repository for e in snap.backups if e.repository} | set(snap.usage))
    growth_series = []
    for repo in repos:
        total = ((snap.usage.get(repo) or {}).get("usage") or {}).get("total") or {}
        current = total.get("stored_bytes")
        growth_series.append(
            Series(
                repo, growth(snap.backups, repo, float(current) if current is not None else None, snap.now)
            )
        )
    growth_chart = chart(
        growth_series, start=start, end=snap.now, label="Repository stored bytes", value_text=size, lines=True
    )
    return (
        f"<section><h2>Backup durations</h2>{duration_chart}</section>"
        f"<section><h2>Repository growth</h2>{growth_chart}</section>"
    )


def _plan(snap: Snapshot) -> str:
    if snap.plan_text is None:
        return '<section><h2>Last plan</h2><p class="muted">No plan recorded yet.</p></section>'
    return (
        f'<section><h2>Last plan <span class="muted">{when(snap.plan_time, snap.now)}</span></h2>'
        f"<pre>{chr(10).join(text(line) for line in snap.plan_text.splitlines())}</pre></section>"
    )


def _events(title: str, events: Sequence[EventRow], now: datetime) -> str:
    rows = [
        (
            when(e.time, now),
            text(e.kind),
            text(e.subject),
            f'<span class="{text(e.outcome)}">{text(e.outcome)}</span>',
            text(e.message),
        )
        for e in events
    ]
    return (
        f"<section><h2>{title}</h2>"
        + _table(("Time", "Kind", "Subject", "Outcome", "Message"), rows)
        + "</section>"
    )


def render_page(snap: Snapshot, *, chart_days: int = 30) -> str:
    """The whole status page."""
    body = "".join(
        (
            _header(snap),
            "<main>",
            _attention(snap),
            _hosts(snap),
            _repositories(snap),
            _charts(snap, chart_days),
            _plan(snap),
            _events("Recent events", snap.events, snap.now),
            _events("Notifications", snap.notifications, snap.now),
            "</main>",
        )
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="refresh" content="60">'
        '<link rel="icon" href="data:,">'
        "<title>esxi-reconciler status</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )
