"""Client of a simulated host's control API: HTTP/1.1 with JSON bodies over ``run/control.sock``."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ControlError(RuntimeError):
    """The control API answered with an error status, or could not be reached."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class VimCmdResult:
    """What ``vim-cmd`` printed and returned."""

    stdout: str
    stderr: str
    exit: int


class ControlClient:
    """Talk to one esxisim-host process (``POST /vimcmd``, ``/guest-write``, ``/fault``, ``/create-vm``,
    ``GET /state``)."""

    def __init__(self, socket_path: str | Path, timeout: float = 600.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """Send one request and return the decoded JSON answer; raise ControlError on a non-2xx."""
        conn = _UnixHTTPConnection(self.socket_path, self.timeout if timeout is None else timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except OSError as exc:
                raise ControlError(f"{method} {path} on {self.socket_path}: {exc}") from exc
        finally:
            conn.close()
        text = raw.decode("utf-8", errors="replace")
        if not 200 <= resp.status < 300:
            raise ControlError(f"{method} {path}: HTTP {resp.status}: {text.strip()}")
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ControlError(f"{method} {path}: answer is not JSON: {text[:200]!r}") from exc

    def vimcmd(self, argv: list[str]) -> VimCmdResult:
        """Run ``vim-cmd`` with ``argv`` (without the program name) in the host process."""
        ans = self.request("POST", "/vimcmd", {"argv": list(argv)})
        return VimCmdResult(str(ans.get("stdout", "")), str(ans.get("stderr", "")), int(ans.get("exit", 0)))

    def guest_write(self, vm: str, percent: float, seed: int) -> dict[str, Any]:
        """Write ``percent`` % of each disk of the powered-on VM ``vm``; return the written extents."""
        ans = self.request("POST", "/guest-write", {"vm": vm, "percent": percent, "seed": seed})
        if not isinstance(ans, dict):
            raise ControlError(f"/guest-write: unexpected answer {ans!r}")
        return ans

    def guest_write_from(
        self, vm: str, disk: int, image: str | Path, ranges: list[tuple[int, int]]
    ) -> dict[str, Any]:
        """Rewrite ``ranges`` (offset, length) of disk number ``disk`` (0-based) of the powered-on VM ``vm``
        with the bytes at the same offsets of the raw image ``image``: a guest changing a file inside a
        real filesystem (see :func:`esxisim.guestdisk.changed_ranges`)."""
        body = {
            "vm": vm,
            "disk": disk,
            "image": str(Path(image).resolve()),
            "ranges": [{"off": off, "len": length} for off, length in ranges],
        }
        ans = self.request("POST", "/guest-write-from", body)
        if not isinstance(ans, dict):
            raise ControlError(f"/guest-write-from: unexpected answer {ans!r}")
        return ans

    def fault(self, kind: str, **options: Any) -> dict[str, Any]:
        """Inject (or clear) a fault in the host process: api-slow, api-down, api-up, snapshot-fail ..."""
        ans = self.request("POST", "/fault", {"kind": kind, **options})
        return ans if isinstance(ans, dict) else {"ok": True}

    def create_vm(self, vm: dict[str, Any]) -> dict[str, Any]:
        """Add a VM while the host runs (``vm``: one VM of sim.json, see docs/lab.md); returns its
        ``vmid`` and ``vmx``. Remove it with ``vim-cmd vmsvc/destroy`` (powered off)."""
        ans = self.request("POST", "/create-vm", vm)
        if not isinstance(ans, dict):
            raise ControlError(f"/create-vm: unexpected answer {ans!r}")
        return ans

    def state(self) -> dict[str, Any]:
        """Return the host's VMs (ids, power, snapshots, disk chains, change ids) and datastores."""
        ans = self.request("GET", "/state")
        if not isinstance(ans, dict):
            raise ControlError(f"/state: unexpected answer {ans!r}")
        return ans

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the process to stop cleanly."""
        self.request("POST", "/shutdown", {}, timeout=timeout)
