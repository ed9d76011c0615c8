"""The daemon's operations listener against the lab: ``/metrics`` scraped while a backup runs and after
it, checked name by name, type by type and value by value against the status store and the
repository; ``/healthz`` and ``/readyz``; the token refused and accepted (bearer, basic, a forge's HMAC
signature); the node_exporter text file; and the status page in a real headless Chromium (Debian's
``chromium``, driven through its own command line: ``--dump-dom`` for the DOM, ``--screenshot`` for
the pictures, ``--enable-logging=stderr`` for the console) at desktop and phone width, with a VM whose
name holds markup, quotes and a line break.

Screenshots go to ``$ESXI_RECONCILER_SCREENSHOTS`` when set (``docs/status-page.png`` was made so),
else into the test's temporary directory."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from esxisim.handle import LabHandle
from reconciler.config import load_config
from reconciler.daemon import Daemon
from reconciler.daemon.notify import Notifier as SystemdNotifier
from reconciler.operations.repositories import open_repository
from reconciler.repository import KdfParams, Repository
from reconciler.repository.stats import usage_report
from reconciler.status.history import HistoryQuery
from reconciler.status.store import StatusStore, status_path
from tests.integration.labconfig import PASSPHRASE, policy_yaml, private_file, write_lab_config
from tests.waiting import wait_until as _wait_until

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("restore_logging")]

MiB = 1 << 20
TOKEN = "web-Token-0123456789abcdef"
HOSTILE = "evil <script>alert('x')<script> \"q\" &amp;\nline two"
PLAIN = "webpage-01"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


wait_until = partial(_wait_until, timeout=180.0, poll=0.2)


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]


def request(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b""
) -> Response:
    req = urllib.request.Request(
        url, method=method, headers=headers or {}, data=body if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Response(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as err:
        return Response(err.code, err.read(), dict(err.headers))


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def metrics(base: str) -> dict[str, Any]:
    """name → family, of one scrape."""
    resp = request(base + "metrics", headers=BEARER)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=")
    return {f.name: f for f in text_string_to_metric_families(resp.body.decode())}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total").removesuffix("_sum").removesuffix("_count")
    found = [
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample, labels, families[family].samples)
    return float(found[0])


def chromium(url: str, out: Path, *, width: int, name: str) -> tuple[str, list[str]]:
    """The page's DOM after load and the console lines, and a full-height screenshot ``out/name``."""
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
    ]  # fmt: skip
    dom = subprocess.run(
        [*flags, f"--user-data-dir={out / (name + '.profile')}", f"--window-size={width},900",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    shot = subprocess.run(
        [*flags, f"--user-data-dir={out / (name + '.profile2')}", f"--window-size={width},2600",
         f"--screenshot={out / name}", url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    console = [ln for ln in (dom.stderr + shot.stderr).splitlines() if ":CONSOLE" in ln]
    return dom.stdout, console


class _Text(HTMLParser):
    """The text of a document and the tags it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(dom: str) -> _Text:
    parser = _Text()
    parser.feed(dom)
    return parser


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.fixture
def scratch_vms(lab: LabHandle) -> Iterator[None]:
    created = [(lab.licensed, HOSTILE), (lab.free, PLAIN)]
    for seed, (host, name) in enumerate(created, start=8101):
        disks = [
            {"size": 24 * MiB, "fill": 0.5, "seed": seed},
            {"size": 8 * MiB, "fill": 0.25, "seed": seed + 10},
        ]
        lab.client(host).create_vm({"name": name, "disks": disks, "power": "poweredOn"})
    try:
        yield
    finally:
        for host, name in created:
            for vm in lab.client(host).state()["vms"]:
                if vm["name"] == name:
                    lab.client(host).vimcmd(["vmsvc/power.off", str(vm["vmid"])])
                    assert lab.client(host).vimcmd(["vmsvc/destroy", str(vm["vmid"])]).exit == 0


def test_metrics_health_token_and_the_status_page(
    lab: LabHandle, scratch_vms: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    policies = policy_yaml(
        "hostile", lab.licensed, [HOSTILE], schedule="{every: 1h}", extra="  cbt: unmanaged\n"
    )
    policies += policy_yaml("plain", lab.free, [PLAIN], schedule="{every: 1h}", extra="  cbt: unmanaged\n")
    config = write_lab_config(lab, tmp_path, policies)
    token_file = private_file(tmp_path / "secrets" / "http.token", TOKEN + "\n")
    port = free_port()
    textfile = tmp_path / "textfile" / "esxi_reconciler.prom"
    textfile.parent.mkdir()
    (config / "monitoring.yaml").write_text(
        f"""apiVersion: esxi-reconciler/v1
kind: Monitoring
metadata: {{name: default}}
spec:
  listen: {{address: 127.0.0.1, port: {port}, token: {{file: {token_file}}}}}
  textfile: {textfile}
  ready_after: 10m
"""
    )
    desired = load_config(config)
    Repository.init(tmp_path / "repo", PASSPHRASE, kdf=KdfParams(memory_kib=1024, iterations=1, lanes=1))
    state = tmp_path / "state"
    daemon = Daemon(config, state, resync=3600.0, min_interval=0.5, notifier=SystemdNotifier({}), watch=False)
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(daemon.run()), name="daemon")
    thread.start()
    base = f"http://127.0.0.1:{port}/"
    shots = Path(os.environ.get("ESXI_RECONCILER_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    def listening() -> bool:
        try:
            return request(base + "healthz").status == 200
        except OSError:
            return False

    try:
        # -- during the first cycle's backups --------------------------------------------------------
        wait_until("the listener", listening)
        during = wait_until(
            "a scrape while the cycle runs",
            lambda: (m := metrics(base)) and value(m, "esxi_reconciler_cycle_running") == 1 and m,
        )
        assert during["esxi_reconciler_cycle_running"].type == "gauge"
        assert during["esxi_reconciler_cycles"].type == "counter"
        assert value(during, "esxi_reconciler_cycles_total") == 1
        assert value(during, "esxi_reconciler_config_loaded") == 1
        assert request(base + "readyz").status == 200  # a cycle is running: ready

        # -- after it --------------------------------------------------------------------------------
        def done() -> bool:
            return daemon.cycles >= 1 and daemon.last_result is not None and textfile.exists()

        wait_until("the first cycle and its records", done, timeout=600)
        scraped = metrics(base)
        with StatusStore.open(status_path(state), readonly=True) as store:
            backups = store.events.events(HistoryQuery(kinds=("backup",), limit=None))
            runs = store.history()
            conditions = {(c.kind, c.name): c for c in store.conditions()}
        assert {(e.host, e.vm, e.outcome) for e in backups} == {
            (lab.licensed, HOSTILE, "ok"),
            (lab.free, PLAIN, "ok"),
        }, [e.message for e in backups]
        repo = open_repository(desired.repository("r"))
        points = repo.list_points()
        report = usage_report(repo, points)
        for event in backups:
            assert event.host is not None and event.vm is not None and event.policy is not None
            vm = {"host": event.host, "vm": event.vm, "policy": event.policy}
            for name in ("bytes_read", "bytes_sent", "bytes_stored"):
                assert value(scraped, f"esxi_reconciler_backup_{name}_total", **vm) == event.detail[name]
            assert event.detail["bytes_read"] > 0 and event.detail["bytes_stored"] > 0
            assert value(scraped, "esxi_reconciler_backups_total", outcome="ok", **vm) == 1
            assert value(scraped, "esxi_reconciler_backup_duration_seconds_count", **vm) == 1
            assert value(scraped, "esxi_reconciler_backup_duration_seconds_sum", **vm) == pytest.approx(
                event.seconds
            )
            record = runs[f"backup/{event.policy}/{event.host}/{event.vm}"]
            assert record.last_succeeded is not None
            assert value(scraped, "esxi_reconciler_backup_last_success_timestamp_seconds", **vm) == (
                pytest.approx(record.last_succeeded.timestamp())
            )
            assert value(scraped, "esxi_reconciler_backup_consecutive_failures", **vm) == 0
            mine = [p for p in points if p.vm.name == event.vm and p.vm.host == event.host]
            assert len(mine) == 1
            where = {"repository": "r", "host": event.host, "vm": event.vm}
            assert value(scraped, "esxi_reconciler_restore_points", **where) == 1
            status = conditions[("vm", f"{event.host}/{event.vm}")].status
            assert (
                value(
                    scraped,
                    "esxi_reconciler_condition",
                    kind="vm",
                    name=f"{event.host}/{event.vm}",
                    status=status,
                )
                == 1
            )
        assert scraped["esxi_reconciler_backup_bytes_read"].type == "counter"
        assert scraped["esxi_reconciler_backup_duration_seconds"].type == "summary"
        assert scraped["esxi_reconciler_backup_last_success_timestamp_seconds"].type == "gauge"
        assert scraped["esxi_reconciler_repository_stored_bytes"].type == "gauge"
        assert (
            value(scraped, "esxi_reconciler_repository_stored_bytes", repository="r")
            == report.total.stored
            > 0
        )
        assert (
            value(scraped, "esxi_reconciler_repository_logical_bytes", repository="r") == report.total.logical
        )
        assert value(scraped, "esxi_reconciler_cycle_running") == 0
        assert value(scraped, "esxi_reconciler_host_reachable", host=lab.free) == 1
        assert value(scraped, "esxi_reconciler_build_info", version=__import__("reconciler").__version__) == 1
        assert "process_resident_memory_bytes" in scraped
        # The text file for node_exporter: the same families, no process metrics, parseable.
        in_file = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
        assert (
            value(in_file, "esxi_reconciler_repository_stored_bytes", repository="r") == report.total.stored
        )
        assert "process_resident_memory_bytes" not in in_file
        assert not list(textfile.parent.glob("*.tmp*"))

        # -- health, readiness, the token ------------------------------------------------------------
        assert request(base + "healthz").status == 200
        ready = request(base + "readyz")
        assert ready.status == 200 and ready.body.startswith(b"ready: last cycle finished")
        for path in ("", "metrics"):
            refused = request(base + path)
            assert refused.status == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
            assert request(base + path, headers={"Authorization": "Bearer wrong"}).status == 401
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        assert request(base, headers={"Authorization": f"Basic {basic}"}).status == 200
        hook = f"{base}hooks/git"
        body = b'{"ref": "refs/heads/main"}'
        assert request(hook, method="POST", body=body).status == 401
        signature = "sha256=" + hmac.new(b"not the token", body, hashlib.sha256).hexdigest()
        assert (
            request(hook, method="POST", body=body, headers={"X-Hub-Signature-256": signature}).status == 401
        )
        signature = "sha256=" + hmac.new(TOKEN.encode(), body, hashlib.sha256).hexdigest()
        answer = request(hook, method="POST", body=body, headers={"X-Hub-Signature-256": signature})
        assert answer.status == 404 and b"follows no git source" in answer.body  # run --config: none
        assert TOKEN not in capfd.readouterr().err

        # -- the status page in Chromium, desktop and phone ------------------------------------------
        page = f"http://anyone:{TOKEN}@127.0.0.1:{port}/"
        for width, name in ((1280, "status-page-desktop.png"), (390, "status-page-phone.png")):
            dom, console = chromium(page, shots, width=width, name=name)
            assert console == [], console
            parsed = parse(dom)
            text = "".join(parsed.text)
            assert HOSTILE.replace("\n", "\\n") in text  # shown as written, the line break made visible
            assert "script" not in parsed.tags  # never markup
            assert PLAIN in text and lab.free in text and lab.licensed in text
            for point in points:
                assert point.id in text
            assert "Backup durations" in text and "Repository growth" in text and "<svg" in dom
            assert "Last plan" in text and "Recent events" in text
            shot = shots / name
            assert shot.stat().st_size > 10_000
            assert png_size(shot)[0] == width
            # Phone width: the viewport follows the device, and every table scrolls inside its own box,
            # so the page itself never gets wider than the screen.
            assert 'name="viewport" content="width=device-width' in dom
            assert dom.count("<table") == dom.count('<div class="wrap"><table') > 0
    finally:
        daemon.request_stop()
        thread.join(60)
    assert exit_codes == [0]
