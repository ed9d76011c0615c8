"""Repository objects in S3-compatible object storage (AWS S3, Backblaze B2, Wasabi, MinIO, Garage, Ceph RGW).

The same :class:`~reconciler.repository.backend.Backend` protocol as the local directory, on boto3 (see
bench/RESULTS.md for why boto3 and not obstore). How the format's guarantees (docs/repository-format.md
§3.7, §5, §7, §13) map onto an object store:

* **No half-written object is ever visible.** A single PUT, and a multipart upload until its
  ``CompleteMultipartUpload``, is invisible; the object appears whole or not at all. So the staging
  directory ``tmp/`` is not used: objects are written straight to their names.
* **Put-if-absent** (:meth:`S3Backend.put`: key files, indexes, manifests, locks) is a conditional write,
  ``If-None-Match: *``, where the service supports it (AWS S3 since 2024, MinIO, Ceph RGW, Garage, moto);
  a service that answers 501 gets a HEAD before the PUT instead (best effort, as the local backend on a
  file system without hard links).
* **Deferred chunk writes** (:meth:`S3Backend.put_deferred`) are uploaded by a thread pool while the
  backup goes on; :meth:`S3Backend.flush` waits for all of them. A failed upload poisons the backend like
  a failed ``syncfs`` (no index or manifest may follow it). The bytes in flight are bounded.
* **Big objects** (a disk index of a multi-TiB disk) go as parallel multipart uploads and come back as
  parallel ranged GETs. An upload that is interrupted (process killed) stays invisible; GC aborts it
  under the exclusive lock (:meth:`S3Backend.incomplete_uploads`).
* **Retries**: botocore's ``standard`` retry mode — exponential backoff with jitter on throttling
  (503 SlowDown, 429), 5xx answers, timeouts and dropped connections.
* **Time**: lock times are taken from, and compared with, the object store's clock (the ``Date`` header),
  so hosts whose clocks disagree still agree on which lock is stale (§7).
* **Errors** a person must act on (access denied, no such bucket, quota, TLS) become one-line
  :class:`StorageError`\\ s; a service that stays unreachable or keeps failing after the retries is an
  :class:`ObjectStoreUnavailable` (transient: the daemon retries the job later).
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from reconciler.repository.backend import Data, ObjectInfo, Uploads, check_name, object_kind
from reconciler.repository.errors import (
    MissingObjectError,
    NotARepositoryError,
    ObjectStoreUnavailable,
    RepositoryError,
    StorageError,
)
from reconciler.units import human_size

MiB = 1024 * 1024
PART_SIZE = 8 * MiB
"""Multipart part size, and the size of one ranged GET."""
MULTIPART_THRESHOLD = 16 * MiB
"""Objects larger than this are uploaded in parts (chunks, manifests and most indexes are far smaller)."""
MAX_INFLIGHT_BYTES = 64 * MiB
"""Deferred uploads queued or running at once; ``put_deferred`` waits beyond it (bounded memory)."""
SETTLE_SECONDS = 10.0
"""How long GC, holding its exclusive lock, waits before listing ``locks/`` again and sweeping: longer
than a new lock object takes to appear in a listing on a store whose listings lag behind writes (AWS S3,
MinIO, Ceph RGW and Garage list consistently; some gateways and older services do not). §13.3."""
HEAD_LOOKUPS_BEFORE_LISTING = 256
"""Chunk existence checks answered by HEAD before the backend lists ``chunks/`` once instead (§13)."""

_DENIED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "InvalidSecurity",
        "UnauthorizedAccess",
        "403",
    }
)
_FULL = frozenset(
    {"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "StorageFull", "QuotaExceededException"}
)
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION = frozenset({"PreconditionFailed", "412"})
_CONFLICT = frozenset({"ConditionalRequestConflict", "409", "OperationAborted"})
_NOT_IMPLEMENTED = frozenset({"NotImplemented", "501"})


@dataclass(frozen=True)
class S3Location:
    """Where a repository lives in object storage, and how to reach it (credentials already revealed)."""

    bucket: str
    prefix: str = ""
    """Key prefix of the repository inside the bucket, without leading or trailing ``/`` ("" = the root)."""
    endpoint: str | None = None
    """``https://s3.eu-central-003.backblazeb2.com``; None: AWS S3 of ``region``."""
    region: str = "us-east-1"
    path_style: bool = False
    """Address the bucket as ``endpoint/bucket`` (MinIO, Garage, Ceph RGW) instead of ``bucket.endpoint``."""
    verify: bool | str = True
    """TLS: True (system CAs), a CA bundle file (a pinned private CA), or False (insecure, warned)."""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.strip("/"))

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` — how messages name the place (never a credential)."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


def _code(exc: botocore.exceptions.ClientError) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if not code:
        code = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Backend:
    """Objects in one bucket under a prefix; see the module doc. Thread-safe."""

    def __init__(  # noqa: PLR0913  the location plus keyword-only tuning with defaults (tests and the bench set them)
        self,
        location: S3Location,
        *,
        label: str | None = None,
        max_concurrency: int = 8,
        max_attempts: int = 10,
        part_size: int = PART_SIZE,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self.loc = location
        self.label = label
        self.settle_seconds = settle_seconds
        self.part_size = part_size
        self.multipart_threshold = multipart_threshold
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        config = botocore.config.Config(
            region_name=location.region,
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max(10, 2 * max_concurrency + 2),
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path" if location.path_style else "virtual"},
            # Blobs carry their own integrity (ids, trailers, AEAD tags); checksum headers on every request
            # cost CPU and are refused by some S3-compatible services.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=location.access_key_id,
            aws_secret_access_key=location.secret_access_key,
            aws_session_token=location.session_token,
            region_name=location.region,
        )
        self.client: Any = session.client(
            "s3", endpoint_url=location.endpoint, verify=location.verify, config=config
        )
        self._lock = threading.Lock()
        self._uploads = ThreadPoolExecutor(max_concurrency, thread_name_prefix="s3-upload")
        self._parts = ThreadPoolExecutor(max_concurrency, thread_name_prefix="s3-part")
        self._inflight: dict[str, Future[None]] = {}
        self._inflight_bytes = 0
        self._room = threading.Condition(self._lock)
        self.max_inflight_bytes = max_inflight_bytes
        self._failed: RepositoryError | None = None
        self._conditional = True
        self._known_chunks: set[str] | None = None
        self._head_lookups = 0
        self._clock_offset: float | None = None
        self.requests = 0
        """Requests sent (for tests and the benchmark; retries inside botocore count once)."""

    def __repr__(self) -> str:
        return f"S3Backend({self.loc.url!r})"

    # -- naming --------------------------------------------------------------------------------------

    @property
    def location(self) -> str:
        """``s3://bucket/prefix at https://endpoint`` (AWS: without the endpoint)."""
        where = f" at {self.loc.endpoint}" if self.loc.endpoint else f" in {self.loc.region}"
        return f"{self.loc.url}{where}"

    def describe(self) -> str:
        """``repository offsite (s3://bucket/prefix at https://minio:9000)`` — how messages name it."""
        return f"repository {self.label} ({self.location})" if self.label else f"repository {self.location}"

    # -- errors --------------------------------------------------------------------------------------

    def _error(self, exc: Exception, doing: str, needed: int | None = None) -> RepositoryError:
        """One line for an error the retries did not cure: the repository, the cause and the fix."""
        where = self.describe()
        size = f" of {human_size(needed)}" if needed else ""
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            if code in _DENIED:
                return StorageError(
                    f"{where}: access denied {doing}{size} ({code}); check the access key and secret named by"
                    f" the Repository's backend.credentials, and that they may list, read, write and delete"
                    f" objects under {self.loc.url}, then run again",
                    errno.EACCES,
                )
            if code == "NoSuchBucket":
                return StorageError(
                    f"{where}: the bucket {self.loc.bucket!r} does not exist ({doing}); create it, or fix"
                    " backend.bucket (and backend.endpoint/region), then run again",
                    errno.ENOENT,
                )
            if code in _FULL:
                return StorageError(
                    f"{where}: the object store refuses more data ({code}) {doing}{size}; raise the bucket's"
                    f" quota or free space (esxi-reconciler repo gc {self.label or '...'}), then run again"
                    " — nothing needs cleaning up by hand",
                    errno.EDQUOT,
                )
            status = _status(exc)
            return ObjectStoreUnavailable(
                f"{where}: the object store answered {status or ''} {code} {doing}{size} after"
                f" {self.max_attempts} attempts; run again later (the job is retried)"
            )
        if isinstance(exc, botocore.exceptions.SSLError):
            return StorageError(
                f"{where}: TLS verification of {self.loc.endpoint or 'the endpoint'} failed ({doing});"
                " pin the service's CA with backend.tls.ca_file, or fix its certificate",
                errno.EACCES,
            )
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StorageError(
                f"{where}: no credentials ({doing}); set backend.credentials in the Repository document",
                errno.EACCES,
            )
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectionError):
            return ObjectStoreUnavailable(
                f"{where}: cannot reach the object store ({doing}: {exc.__class__.__name__}); check"
                " backend.endpoint, the network and the firewall, then run again"
            )
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return ObjectStoreUnavailable(f"{where}: {doing} failed ({exc}); run again later")
        raise exc

    def _call(self, doing: str, operation: str, needed: int | None = None, **params: Any) -> Any:
        """One client call; errors other than the caller's own codes become :meth:`_error`."""
        try:
            response = getattr(self.client, operation)(**params)
        except botocore.exceptions.ClientError:
            raise
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.SSLError) as exc:
            raise self._error(exc, doing, needed) from exc
        with self._lock:
            self.requests += 1
        self._note_date(response)
        return response

    def _note_date(self, response: Any) -> None:
        if self._clock_offset is not None or not isinstance(response, dict):
            return
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date:
            with contextlib.suppress(TypeError, ValueError):
                self._clock_offset = parsedate_to_datetime(date).timestamp() - time.time()

    @contextlib.contextmanager
    def volume_errors(self, doing: str, needed: int | None = None) -> Iterator[None]:
        """Turn a client error into the one-line repository error (see :meth:`_error`)."""
        try:
            yield
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._error(exc, doing, needed) from exc

    # -- writes --------------------------------------------------------------------------------------

    def _put_object(self, name: str, body: bytes, *, if_absent: bool) -> bool:
        """Store ``body`` under ``name`` (multipart when big); False when ``if_absent`` and it exists."""
        key = self.loc.key(name)
        doing = f"writing {object_kind(name)}"
        if if_absent and not self._conditional and self.exists(name):
            return False
        conditional = if_absent and self._conditional
        try:
            if len(body) > self.multipart_threshold:
                self._multipart(key, body, doing, conditional)
            else:
                params: dict[str, Any] = {"Bucket": self.loc.bucket, "Key": key, "Body": body}
                if conditional:
                    params["IfNoneMatch"] = "*"
                self._call(doing, "put_object", len(body), **params)
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if conditional and code in _PRECONDITION:
                return False
            if conditional and code in _CONFLICT:
                # another writer's conditional write of the same name was in progress: it exists now
                return False
            if conditional and code in _NOT_IMPLEMENTED:
                self._conditional = False  # this service has no conditional writes: HEAD, then PUT
                return self._put_object(name, body, if_absent=True)
            raise self._error(exc, doing, len(body)) from exc
        self._remember(name)
        return True

    def _multipart(self, key: str, body: bytes, doing: str, conditional: bool) -> None:
        """Parallel multipart upload; aborted on any failure, so nothing half-written stays behind."""
        upload = self._call(doing, "create_multipart_upload", Bucket=self.loc.bucket, Key=key)["UploadId"]
        try:
            view = memoryview(body)
            starts = range(0, len(body), self.part_size)

            def part(number: int, start: int) -> dict[str, Any]:
                answer = self._call(
                    doing,
                    "upload_part",
                    Bucket=self.loc.bucket,
                    Key=key,
                    UploadId=upload,
                    PartNumber=number,
                    Body=bytes(view[start : start + self.part_size]),
                )
                return {"PartNumber": number, "ETag": answer["ETag"]}

            futures = [self._parts.submit(part, n, s) for n, s in enumerate(starts, 1)]
            parts = [f.result() for f in futures]
            params: dict[str, Any] = {
                "Bucket": self.loc.bucket,
                "Key": key,
                "UploadId": upload,
                "MultipartUpload": {"Parts": parts},
            }
            if conditional:
                params["IfNoneMatch"] = "*"
            self._call(doing, "complete_multipart_upload", **params)
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.loc.bucket, Key=key, UploadId=upload)
            raise

    def put(self, name: str, parts: Sequence[Data]) -> bool:
        check_name(name)
        return self._put_object(name, b"".join(parts), if_absent=True)

    def replace(self, name: str, parts: Sequence[Data]) -> None:
        check_name(name)
        self._put_object(name, b"".join(parts), if_absent=False)

    def _check_not_failed(self) -> None:
        failed = self._failed
        if isinstance(failed, StorageError):  # the same one-line message for every later write
            raise StorageError(str(failed), failed.errno)
        if failed is not None:
            raise type(failed)(str(failed))

    def put_deferred(self, name: str, parts: Sequence[Data]) -> bool:
        """Queue the upload of a chunk (content-addressed: an overwrite is harmless); waits while
        :attr:`max_inflight_bytes` are queued. False if it exists or is queued already."""
        check_name(name)
        self._check_not_failed()
        if self.exists(name):
            return False
        body = b"".join(parts)
        with self._room:
            if name in self._inflight:
                return False
            while self._inflight_bytes and self._inflight_bytes + len(body) > self.max_inflight_bytes:
                self._room.wait()
                self._check_not_failed()
            if name in self._inflight:
                return False
            self._inflight_bytes += len(body)
            future = self._uploads.submit(self._upload_deferred, name, body)
            self._inflight[name] = future
        return True

    def _upload_deferred(self, name: str, body: bytes) -> None:
        try:
            self._put_object(name, body, if_absent=False)
        except BaseException as exc:
            with self._lock:
                if self._failed is None:
                    self._failed = (
                        exc
                        if isinstance(exc, RepositoryError)
                        else RepositoryError(
                            f"{self.describe()}: uploading {object_kind(name)} failed"
                            f" ({exc.__class__.__name__}: {exc}); reopen the repository and run again"
                        )
                    )
            raise
        finally:
            with self._room:
                self._inflight_bytes -= len(body)
                self._room.notify_all()

    def flush(self) -> None:
        """Wait until every queued chunk is stored; raise (and stay failed) if any upload failed."""
        while True:
            with self._lock:
                futures = list(self._inflight.items())
            if not futures:
                break
            for name, future in futures:
                with contextlib.suppress(BaseException):
                    future.result()
                with self._lock:
                    if self._inflight.get(name) is future:
                        del self._inflight[name]
        self._check_not_failed()

    def discard_pending(self) -> None:
        """Cancel queued uploads and wait for running ones (what they store is garbage for GC)."""
        with self._lock:
            futures = list(self._inflight.values())
        for future in futures:
            future.cancel()
        for future in futures:
            with contextlib.suppress(BaseException):
                future.result()
        with self._lock:
            self._inflight.clear()

    def close(self) -> None:
        """Wait for uploads and stop the thread pools (a backend is not used after this)."""
        self.discard_pending()
        self._uploads.shutdown(wait=True)
        self._parts.shutdown(wait=True)

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, name: str) -> bytes:
        """The whole object: one GET for small objects, parallel ranged GETs of :attr:`part_size` for
        big ones (the first range tells the size)."""
        check_name(name)
        key = self.loc.key(name)
        doing = f"reading {object_kind(name)}"
        try:
            first = self._call(
                doing, "get_object", Bucket=self.loc.bucket, Key=key, Range=f"bytes=0-{self.part_size - 1}"
            )
            head = self._read_body(first, doing)
            total = _total_size(first, len(head))
            if total <= len(head):
                return head
            etag = first.get("ETag")

            def ranged(start: int) -> bytes:
                end = min(start + self.part_size, total) - 1
                params: dict[str, Any] = {
                    "Bucket": self.loc.bucket,
                    "Key": key,
                    "Range": f"bytes={start}-{end}",
                }
                if etag:
                    params["IfMatch"] = etag  # the same object throughout (a lock may be replaced)
                return self._read_body(self._call(doing, "get_object", **params), doing)

            rest = list(self._parts.map(ranged, range(len(head), total, self.part_size)))
            return b"".join([head, *rest])
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _MISSING or _code(exc) == "NoSuchKey":
                raise MissingObjectError(name) from None
            if _code(exc) == "InvalidRange":  # an empty object
                return b""
            raise self._error(exc, doing) from exc

    def _read_body(self, response: Any, doing: str) -> bytes:
        try:
            data: bytes = response["Body"].read()
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise ObjectStoreUnavailable(
                f"{self.describe()}: the connection broke {doing} ({exc.__class__.__name__}); run again"
            ) from exc
        return data

    def exists(self, name: str) -> bool:
        """Queued or stored. Chunk checks start as HEAD requests; after :data:`HEAD_LOOKUPS_BEFORE_LISTING`
        of them ``chunks/`` is listed once and kept (plus what this process writes) until
        :meth:`reset_caches` — called whenever a lock is taken, so the listing is always made under the
        current lock, while GC cannot run."""
        check_name(name)
        with self._lock:
            if name in self._inflight:
                return True
            known = self._known_chunks
            is_chunk = name.startswith("chunks/")
            if is_chunk and known is not None:
                return name in known
            self._head_lookups += is_chunk
            list_now = is_chunk and self._head_lookups > HEAD_LOOKUPS_BEFORE_LISTING
        if list_now:
            listed = set(self.list("chunks"))
            with self._lock:
                if self._known_chunks is None:
                    self._known_chunks = listed
                else:
                    self._known_chunks |= listed
                return name in self._known_chunks or name in self._inflight
        try:
            self.stat(name)
        except MissingObjectError:
            return False
        return True

    def _remember(self, name: str) -> None:
        if name.startswith("chunks/"):
            with self._lock:
                if self._known_chunks is not None:
                    self._known_chunks.add(name)

    def reset_caches(self) -> None:
        """Forget the chunk listing (a lock is being taken: what GC deleted before must not count)."""
        with self._lock:
            self._known_chunks = None
            self._head_lookups = 0

    def list(self, prefix: str) -> Iterator[str]:
        check_name(prefix)
        base = self.loc.key(prefix) + "/"
        strip = len(self.loc.key(""))
        if self.loc.prefix:
            strip = len(self.loc.prefix) + 1
        token: str | None = None
        doing = f"listing {prefix}/"
        while True:
            params: dict[str, Any] = {"Bucket": self.loc.bucket, "Prefix": base, "MaxKeys": 1000}
            if token:
                params["ContinuationToken"] = token
            try:
                page = self._call(doing, "list_objects_v2", **params)
            except botocore.exceptions.ClientError as exc:
                raise self._error(exc, doing) from exc
            for item in page.get("Contents", ()):
                yield str(item["Key"])[strip:]
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)
        doing = f"looking up {object_kind(name)}"
        try:
            head = self._call(doing, "head_object", Bucket=self.loc.bucket, Key=self.loc.key(name))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                raise MissingObjectError(name) from None
            raise self._error(exc, doing) from exc
        modified: datetime = head["LastModified"]
        return ObjectInfo(name, int(head["ContentLength"]), modified.timestamp())

    def delete(self, name: str) -> None:
        check_name(name)
        doing = f"deleting {object_kind(name)}"
        try:
            self._call(doing, "delete_object", Bucket=self.loc.bucket, Key=self.loc.key(name))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _MISSING or _status(exc) == 404:
                return
            raise self._error(exc, doing) from exc
        with self._lock:
            if self._known_chunks is not None:
                self._known_chunks.discard(name)

    # -- what a directory did on the local backend ---------------------------------------------------

    def make_dir(self, name: str) -> None:
        """Nothing: an object store has no directories."""

    def sync_dir(self, name: str = "") -> None:
        """Nothing: a completed PUT or DELETE is durable."""

    def initialize(self, directories: Sequence[str]) -> None:
        """Check the bucket is reachable and nothing is stored under the prefix (``repo init``)."""
        if any(True for _ in self.list_any()):
            raise RepositoryError(f"{self.describe()}: objects exist under {self.loc.url}; nothing written")

    def list_any(self) -> Iterator[str]:
        """The first object under the repository's prefix, if any (an emptiness check)."""
        prefix = self.loc.key("")
        doing = "listing the repository prefix"
        try:
            page = self._call(doing, "list_objects_v2", Bucket=self.loc.bucket, Prefix=prefix, MaxKeys=1)
        except botocore.exceptions.ClientError as exc:
            raise self._error(exc, doing) from exc
        for item in page.get("Contents", ()):
            yield str(item["Key"])

    def not_a_repository(self, init_hint: str) -> NotARepositoryError:
        try:
            empty = not any(True for _ in self.list_any())
        except RepositoryError as exc:
            return NotARepositoryError(str(exc))
        cause = (
            "nothing is stored under that prefix"
            if empty
            else "objects exist under that prefix but no repository config"
        )
        return NotARepositoryError(
            f"{self.describe()}: not a repository: {cause}; check backend.bucket and backend.prefix; to"
            f" create a new repository there, run {init_hint}. Nothing was written"
        )

    # -- time and leftovers --------------------------------------------------------------------------

    def now(self) -> datetime:
        """The object store's clock (from the ``Date`` of an answer; the local clock until one came):
        lock times are written and judged by it, so clock skew between hosts does not matter (§7)."""
        if self._clock_offset is None:
            with contextlib.suppress(RepositoryError, botocore.exceptions.ClientError):
                self._call("reading the time", "head_bucket", Bucket=self.loc.bucket)
        offset = self._clock_offset or 0.0
        return datetime.fromtimestamp(time.time() + offset, timezone.utc)

    def incomplete_uploads(self) -> Uploads:
        """Multipart uploads under the prefix that were started and never completed or aborted:
        ``(object name, upload id, initiated)``. Invisible to readers; they cost storage until aborted."""
        found: Uploads = []
        params: dict[str, Any] = {"Bucket": self.loc.bucket, "Prefix": self.loc.key("")}
        strip = len(self.loc.prefix) + 1 if self.loc.prefix else 0
        doing = "listing incomplete uploads"
        while True:
            try:
                page = self._call(doing, "list_multipart_uploads", **params)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _NOT_IMPLEMENTED:
                    return found
                raise self._error(exc, doing) from exc
            for upload in page.get("Uploads", ()):
                found.append((str(upload["Key"])[strip:], str(upload["UploadId"]), upload["Initiated"]))
            if not page.get("IsTruncated"):
                return found
            params["KeyMarker"] = page.get("NextKeyMarker")
            params["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def abort_upload(self, name: str, upload_id: str) -> None:
        doing = "aborting an incomplete upload"
        try:
            self._call(
                doing,
                "abort_multipart_upload",
                Bucket=self.loc.bucket,
                Key=self.loc.key(name),
                UploadId=upload_id,
            )
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("NoSuchUpload", *_MISSING):
                return
            raise self._error(exc, doing) from exc


def _total_size(response: Any, got: int) -> int:
    """The object's size from a ranged GET's ``Content-Range: bytes 0-N/TOTAL``."""
    content_range = str(response.get("ContentRange") or "")
    if "/" in content_range:
        total = content_range.rpartition("/")[2]
        if total.isdigit():
            return int(total)
    return got
