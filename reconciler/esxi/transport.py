"""Reading byte ranges of a frozen disk file on a datastore: HTTPS ``/folder`` Range GETs or ``dd``
over SSH. Both readers take the file as a datastore path (``[ds] dir/file-flat.vmdk``) and a list of
extents ``(offset, length)``, split them into pieces of at most ``piece_size`` (4 MiB), fetch the
pieces on ``streams`` parallel workers and yield ``(offset, bytes)`` **in order**. At most
``2 × streams`` pieces are in flight or waiting, so memory stays bounded (≈ 8 × 4 MiB with 4 streams)
whatever the disk size.

* :class:`HttpsRangeReader`: urllib3 pool with the pinned SSL context of :mod:`reconciler.esxi.tls`;
  authenticated with the API session's ``vmware_soap_session`` cookie when given, else (or when the
  cookie is refused with 401) ``Authorization: Basic``, switching to the cookie the host returns with
  ``Set-Cookie`` (real ESXi does; the lab does not), so sessions do not pile up on the host.
* :class:`SshDdReader`: ``dd if=PATH bs=B skip=S count=C`` with B the largest power of two ≤ 1 MiB
  dividing offset and length (unaligned pieces: the enclosing 4 KiB-aligned range, cut locally);
  one SSH connection per worker, replaced before paramiko would rekey (:data:`ROTATE_BYTES`); a
  dropped connection is re-opened and the piece fetched again, up to ``attempts`` times with a
  growing pause (reads are idempotent).

Failures leave as :class:`~reconciler.esxi.errors.TransportError` (urllib3's and paramiko's errors are
its ``__cause__``): transient for a dropped or timed-out connection and for HTTP 5xx/408/429, terminal
for other statuses (401, 403, 404 …) and for a certificate that is no longer the pinned one.

:meth:`reconciler.esxi.host.EsxiHost.disk_reader` picks HTTPS when the API is reachable and SSH
otherwise, unless overridden.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol
from urllib.parse import quote

import urllib3

from reconciler.esxi.errors import ShellError, TransportError, transient_os_error
from reconciler.esxi.shell import RemoteStream, ShellConnection
from reconciler.esxi.vimcmd import command_line
from reconciler.facts.inventory import split_ds_path
from reconciler.parallel import ordered_parallel

log = logging.getLogger(__name__)

MiB = 1 << 20
PIECE_SIZE = 4 * MiB
ROTATE_BYTES = 448 * MiB
"""An SSH connection carries at most this much disk data, then the next piece opens a new one: paramiko
rekeys after 512 MiB, and a rekey racing a channel close deadlocks its transport thread for 30 s
("Key-exchange timed out waiting for key negotiation"; ``Channel._handle_close`` sends from the
transport thread and waits for the key exchange only that thread can finish). Seen in the lab with one
``dd`` channel per piece; a new connection costs a few ms."""


def vmfs_path(ds_path: str) -> str:
    """``[ds] rel`` → ``/vmfs/volumes/ds/rel`` (works on ESXi and in the lab; never use the API's URL)."""
    ds, rel = split_ds_path(ds_path)
    return f"/vmfs/volumes/{ds}/{rel}"


def pieces(extents: Iterable[tuple[int, int]], piece_size: int = PIECE_SIZE) -> Iterator[tuple[int, int]]:
    """Split extents into (offset, length) pieces of at most ``piece_size`` bytes."""
    for off, length in extents:
        if off < 0 or length < 0:
            raise ValueError(f"bad extent {(off, length)}")
        end = off + length
        while off < end:
            n = min(piece_size, end - off)
            yield off, n
            off += n


def _whole(data: bytes, off: int, length: int) -> bytes:
    """``data`` if it is the ``length`` bytes asked for at ``off``; a response cut short is transient
    (the next try reads it whole)."""
    if len(data) != length:
        raise TransportError(f"read {len(data)} bytes at {off}, expected {length}", transient=True)
    return data


def _status_error(what: str, status: int, host: str) -> TransportError:
    """An unexpected HTTP status: the host busy or failing (5xx, 408, 429) may answer the next try; a
    refusal (401, 403), a missing file (404) or a range it cannot serve (416) will not."""
    transient = status >= 500 or status in (408, 429)
    return TransportError(f"{what}: HTTP {status}", host=host, transient=transient)


def _request_failure(what: str, exc: Exception, host: str) -> TransportError:
    """What urllib3 (or the socket under it) raised, as a TransportError: transient unless the TLS
    handshake failed against the pinned certificate (it changed: see :mod:`.tls`)."""
    reason: BaseException = exc
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        reason = exc.reason
    text = str(reason)
    pinned_refused = isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text
    transient = not pinned_refused and (
        isinstance(reason, urllib3.exceptions.HTTPError) or transient_os_error(reason)
    )
    return TransportError(f"{what}: {type(reason).__name__}: {text}", host=host, transient=transient)


class DiskReader(Protocol):
    """What the backup pipeline reads with."""

    def read(self, ds_path: str, extents: Iterable[tuple[int, int]]) -> Iterator[tuple[int, bytes]]: ...

    def close(self) -> None: ...


class HttpsRangeReader:
    """``GET /folder/<path>?dcPath=ha-datacenter&dsName=<ds>`` with ``Range: bytes=a-b``."""

    def __init__(  # noqa: PLR0913  the reader's connection settings, the optional ones keyword-only; it is what carries them
        self,
        address: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        user: str | None = None,
        password: Callable[[], str] | None = None,
        cookie: str | None = None,
        streams: int = 4,
        piece_size: int = PIECE_SIZE,
        timeout: float = 120.0,
        datacenter: str = "ha-datacenter",
        host: str | None = None,
    ) -> None:
        if cookie is None and (user is None or password is None):
            raise ValueError("HttpsRangeReader needs a session cookie or user and password")
        self.host = host or address
        """What errors name as the host (its config name when given, else the address)."""
        self.streams = streams
        self.piece_size = piece_size
        self.datacenter = datacenter
        self._user = user
        self._password = password
        self._cookie = cookie
        self._lock = threading.Lock()
        self.pool = urllib3.HTTPSConnectionPool(
            address,
            port,
            maxsize=streams,
            block=True,
            ssl_context=ssl_context,
            assert_hostname=False,
            timeout=urllib3.Timeout(connect=30.0, read=timeout),
            retries=urllib3.Retry(total=3, connect=3, read=2, status=0, backoff_factor=0.5),
        )

    def _url(self, ds_path: str) -> str:
        ds, rel = split_ds_path(ds_path)
        return f"/folder/{quote(rel)}?dcPath={quote(self.datacenter)}&dsName={quote(ds)}"

    def _headers(self) -> dict[str, str]:
        with self._lock:
            if self._cookie:
                return {"Cookie": self._cookie}
        assert self._user is not None and self._password is not None
        token = base64.b64encode(f"{self._user}:{self._password()}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def _remember_cookie(self, resp: urllib3.BaseHTTPResponse) -> None:
        set_cookie = resp.headers.get("Set-Cookie")
        if set_cookie and "vmware_soap_session" in set_cookie:
            with self._lock:
                if self._cookie is None:
                    self._cookie = set_cookie.split(";", 1)[0]

    def _request(self, ds_path: str, range_header: str | None) -> urllib3.BaseHTTPResponse:
        headers = self._headers()
        if range_header:
            headers["Range"] = range_header
        try:
            resp = self.pool.request(
                "GET", self._url(ds_path), headers=headers, preload_content=True, redirect=False
            )
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            raise _request_failure(f"GET {ds_path}", exc, self.host) from exc
        if resp.status == 401 and "Cookie" in headers and self._user is not None:
            with self._lock:  # the cookie expired or was refused: Basic auth, then its cookie
                if self._cookie == headers["Cookie"]:
                    self._cookie = None
            return self._request(ds_path, range_header)
        self._remember_cookie(resp)
        return resp

    def _get(self, ds_path: str, off: int, length: int) -> bytes:
        resp = self._request(ds_path, f"bytes={off}-{off + length - 1}")
        if resp.status != 206:
            raise _status_error(f"GET {ds_path} bytes {off}+{length}", resp.status, self.host)
        expect = f"bytes {off}-{off + length - 1}/"
        if not str(resp.headers.get("Content-Range", "")).startswith(expect):
            got = resp.headers.get("Content-Range")
            raise TransportError(f"GET {ds_path}: unexpected Content-Range {got}", host=self.host)
        return bytes(resp.data)

    def size(self, ds_path: str) -> int:
        """The file's size (from a 1-byte Range GET's Content-Range)."""
        resp = self._request(ds_path, "bytes=0-0")
        if resp.status != 206:
            raise _status_error(f"GET {ds_path}", resp.status, self.host)
        content_range = str(resp.headers.get("Content-Range", ""))
        try:
            return int(content_range.rsplit("/", 1)[1])
        except (IndexError, ValueError):
            raise TransportError(
                f"GET {ds_path}: unexpected Content-Range {content_range!r}", host=self.host
            ) from None

    def get_file(self, ds_path: str) -> bytes:
        """A whole (small) file, e.g. a descriptor or .vmx."""
        resp = self._request(ds_path, None)
        if resp.status != 200:
            raise _status_error(f"GET {ds_path}", resp.status, self.host)
        return bytes(resp.data)

    def read(self, ds_path: str, extents: Iterable[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """Yield (offset, data) for the extents, in order."""

        def fetch(off: int, length: int) -> bytes:
            return _whole(self._get(ds_path, off, length), off, length)

        return ordered_parallel(pieces(extents, self.piece_size), fetch, self.streams)

    def put_file(self, ds_path: str, body: Iterable[bytes], size: int, *, timeout: float = 3600.0) -> None:
        """Upload a whole file with one streamed ``PUT /folder/...`` of ``size`` bytes (the only way to
        write a datastore file over the API: ``/folder`` has no ranged PUT, so a restore sends the holes
        as zeros). Not retried: the body is a one-shot stream."""
        headers = self._headers()
        headers["Content-Length"] = str(size)
        headers["Content-Type"] = "application/octet-stream"
        try:
            resp = self.pool.urlopen(
                "PUT",
                self._url(ds_path),
                body=iter(body),
                headers=headers,
                retries=False,
                timeout=urllib3.Timeout(connect=30.0, read=timeout),
                preload_content=True,
                chunked=False,
            )
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            raise _request_failure(f"PUT {ds_path}", exc, self.host) from exc
        if resp.status not in (200, 201, 204):
            raise _status_error(f"PUT {ds_path}", resp.status, self.host)
        self._remember_cookie(resp)

    def close(self) -> None:
        self.pool.close()


def dd_block(off: int, length: int, limit: int = MiB) -> int:
    """The largest power of two ≤ ``limit`` dividing both ``off`` and ``length``."""
    bs = limit
    while bs > 1 and (off % bs or length % bs):
        bs //= 2
    return bs


class SshDdReader:
    """``dd`` over SSH, one connection per worker thread."""

    def __init__(
        self,
        connect: Callable[[], ShellConnection],
        *,
        streams: int = 2,
        piece_size: int = PIECE_SIZE,
        timeout: float = 120.0,
        attempts: int = 4,
        host: str | None = None,
    ) -> None:
        self._connect = connect
        self.host = host
        self.attempts = attempts
        self.streams = streams
        self.piece_size = piece_size
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[ShellConnection] = []
        self._lock = threading.Lock()

    def _conn(self, length: int, fresh: bool = False) -> ShellConnection:
        """This thread's connection; a new one when it dropped, when ``fresh``, or before it would carry
        more than :data:`ROTATE_BYTES` (so paramiko never needs to rekey: see the module doc)."""
        conn: ShellConnection | None = getattr(self._local, "conn", None)
        used: int = getattr(self._local, "used", 0)
        if fresh or conn is None or not conn.active or used + length > ROTATE_BYTES:
            if conn is not None:
                # forget it before connecting: if the new connection fails too, the next attempt must
                # not find (and close and unlist a second time) this one
                self._local.conn = None
                with self._lock:
                    self._all.remove(conn)
                conn.close()
            conn = self._connect()
            self._local.conn = conn
            used = 0
            with self._lock:
                self._all.append(conn)
        self._local.used = used + length
        return conn

    def _dd(self, path: str, off: int, length: int) -> bytes:
        bs = dd_block(off, length)
        start, end = off, off + length
        if bs < 4096:  # unaligned: read the enclosing 4 KiB-aligned range and cut (bs=1 is very slow)
            bs = 4096
            start, end = off // bs * bs, -(-(off + length) // bs) * bs
        count = (end - start) // bs
        line = command_line(["dd", f"if={path}", f"bs={bs}", f"skip={start // bs}", f"count={count}"])
        line += " 2>/dev/null"
        for attempt in range(1, self.attempts + 1):
            try:
                conn = self._conn(end - start, fresh=attempt > 1)
                with conn.stream(line, timeout=self.timeout) as stream:
                    data = stream.read_exact(off + length - start)
                    stream.read(end - (off + length))  # the aligned tail, possibly cut by EOF
                    while stream.read(1 << 16):
                        pass
                    return data[off - start :]
            except ShellError as exc:
                if attempt == self.attempts:
                    raise TransportError(f"dd {path} at {off}+{length}: {exc}", host=self.host) from exc
                log.info("SSH read of %s at %d failed (%s); reconnecting", path, off, exc)
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def read(self, ds_path: str, extents: Iterable[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """Yield (offset, data) for the extents, in order."""
        path = vmfs_path(ds_path)
        return ordered_parallel(
            pieces(extents, self.piece_size), lambda o, n: _whole(self._dd(path, o, n), o, n), self.streams
        )

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()


class SshDdWriter:
    """Writes disk data into an existing raw file on the host with ``dd of=PATH bs=B seek=S
    conv=notrunc`` fed over SSH stdin: one ``dd`` per run of contiguous pieces (holes are skipped, so a
    thin disk stays thin), each piece sent as it comes (nothing is buffered here), a new connection
    before one would carry more than :data:`ROTATE_BYTES` (see the module doc). The fallback of
    :class:`~reconciler.esxi.hostwrite.ParallelSshWriter` for hosts without Python."""

    def __init__(
        self, connect: Callable[[], ShellConnection], *, timeout: float = 600.0, host: str | None = None
    ) -> None:
        self._connect = connect
        self.host = host
        self.timeout = timeout
        self._conn: ShellConnection | None = None
        self._used = 0

    def _connection(self, reserve: int) -> ShellConnection:
        """The connection for a run of up to ``reserve`` bytes."""
        if self._conn is None or not self._conn.active or self._used + reserve > ROTATE_BYTES:
            if self._conn is not None:
                self._conn.close()
            self._conn = self._connect()
            self._used = 0
        return self._conn

    def write(
        self,
        path: str,
        data: Iterable[tuple[int, bytes]],
        on_written: Callable[[int, int], None] | None = None,
        *,
        run_limit: int = 64 * MiB,
    ) -> None:
        """Write ``(offset, bytes)`` pieces (ascending, non-overlapping) into ``path`` (a
        ``/vmfs/volumes`` path); ``on_written(offset, length)`` after each piece was sent."""
        run: contextlib.AbstractContextManager[RemoteStream] | None = None
        stream: RemoteStream | None = None
        start = end = 0
        try:
            for off, piece in data:
                if stream is not None and (off != end or end - start + len(piece) > run_limit):
                    stream.close_stdin()
                    assert run is not None
                    done, run, stream = run, None, None
                    done.__exit__(None, None, None)  # checks dd's exit status
                if stream is None:
                    bs = dd_block(off, off)  # the seek must be whole blocks; short pipe reads are fine
                    line = command_line(["dd", f"of={path}", f"bs={bs}", f"seek={off // bs}", "conv=notrunc"])
                    run = self._connection(run_limit).stream(line + " 2>/dev/null", timeout=self.timeout)
                    stream = run.__enter__()
                    start = end = off
                stream.write(piece)
                end += len(piece)
                self._used += len(piece)
                if on_written is not None:
                    on_written(off, len(piece))
            if stream is not None:
                stream.close_stdin()
                assert run is not None
                last, run, stream = run, None, None
                last.__exit__(None, None, None)
        except ShellError as exc:
            raise TransportError(f"dd into {path} at {start}+{end - start}: {exc}", host=self.host) from exc
        finally:
            if run is not None:
                with contextlib.suppress(Exception):
                    run.__exit__(RuntimeError, RuntimeError("stopped"), None)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
