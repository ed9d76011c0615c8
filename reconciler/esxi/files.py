"""Datastore files: small files (.vmx, descriptors, .nvram, journals) read and written whole, folders,
renames, deletes, and a file's SHA-256.

Files go over SSH whenever it is enabled (free hosts always; it keeps thin disks thin, because
``dd conv=notrunc`` skips the holes); a licensed host without SSH uses FileManager tasks, the datastore
browser and HTTPS ``/folder`` (GET, and PUT of a whole file).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyVmomi import vim, vmodl

from reconciler.esxi.api import wait_task
from reconciler.esxi.connection import HostConnection
from reconciler.esxi.errors import ApiError, CommandError, EsxiError, ProtocolError, TaskTimeoutError
from reconciler.esxi.inventory import Inventory
from reconciler.esxi.transport import vmfs_path
from reconciler.esxi.vmdk import Descriptor
from reconciler.esxi.vmx import VmxFile
from reconciler.facts.inventory import VmInfo, split_ds_path

log = logging.getLogger(__name__)

_VMFS_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{12}$")

_SHA256_PROGRAM = (
    "import hashlib,sys\n"
    "h=hashlib.sha256()\n"
    "f=open(sys.argv[1],'rb')\n"
    "for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n"
    "print(h.hexdigest())\n"
)


def ds_join(dir_ds_path: str, name: str) -> str:
    """Resolve a descriptor-relative file name against the datastore path of its directory."""
    if name.startswith("/vmfs/volumes/"):
        ds, _, rel = name[len("/vmfs/volumes/") :].partition("/")
        return f"[{ds}] {rel}"
    ds, rel = split_ds_path(dir_ds_path)
    return f"[{ds}] {posixpath.join(rel, name)}" if rel else f"[{ds}] {name}"


def same_file(a: str, b: str) -> bool:
    """Whether two datastore paths name the same file. An absolute hint may name the datastore by its
    UUID (``/vmfs/volumes/5c59…/vm/vm.vmdk``) where the API uses its name, so when the datastores differ
    only the paths inside them are compared."""
    (ds_a, rel_a), (ds_b, rel_b) = split_ds_path(a), split_ds_path(b)
    return rel_a == rel_b and (ds_a == ds_b or bool(_VMFS_UUID.match(ds_a) or _VMFS_UUID.match(ds_b)))


def dir_of(ds_path: str) -> str:
    """The datastore path of the folder holding ``ds_path``."""
    ds, rel = split_ds_path(ds_path)
    return f"[{ds}] {posixpath.dirname(rel)}"


class Files:
    """The datastore files of one host."""

    def __init__(self, conn: HostConnection, inventory: Inventory) -> None:
        self.conn = conn
        self.inventory = inventory

    # -- reading

    def read_file(self, ds_path: str, max_size: int = 16 << 20) -> bytes:
        """A small datastore file (.vmx, descriptor): SSH ``cat`` when enabled, else HTTPS."""
        if self.conn.shell is not None:
            data = self.conn.ssh().run(["cat", vmfs_path(ds_path)], timeout=120).stdout
        else:
            reader = self.conn.https_reader(streams=1)
            try:
                data = reader.get_file(ds_path)
            finally:
                reader.close()
        if len(data) > max_size:
            raise ProtocolError(f"{ds_path} is larger than {max_size} bytes; not a small file")
        return data

    def file_exists(self, ds_path: str) -> bool:
        if self.conn.shell is not None:
            res = self.conn.ssh().run(["test", "-e", vmfs_path(ds_path)], check=False, timeout=60)
            return res.exit_status == 0
        reader = self.conn.https_reader(streams=1)
        try:
            reader.size(ds_path)
            return True
        except EsxiError:
            return False
        finally:
            reader.close()

    def read_vmx(self, vm: VmInfo | str) -> VmxFile:
        info = vm if isinstance(vm, VmInfo) else self.inventory.vm(vm)
        return VmxFile.parse(self.read_file(info.vmx_path).decode("utf-8", "surrogateescape"))

    def read_descriptor(self, ds_path: str) -> Descriptor:
        return Descriptor.parse(self.read_file(ds_path, 1 << 20).decode("utf-8", "surrogateescape"))

    def file_sha256(self, ds_path: str, *, timeout: float = 3600.0) -> str:
        """SHA-256 (hex) of a datastore file. Over SSH it is computed on the host (``sha256sum``, else
        the host's Python): only 64 bytes cross the network instead of the whole disk. Without SSH the
        file is read back over HTTPS and hashed here."""
        if self.conn.shell is not None:
            path = vmfs_path(ds_path)
            shell = self.conn.ssh()
            # The file on stdin: sha256sum then prints no name (GNU's escapes a name holding a line break).
            res = shell.run(["sh", "-c", 'sha256sum < "$1"', "sh", path], timeout=timeout, check=False)
            if res.exit_status != 0:
                res = shell.run(["python", "-c", _SHA256_PROGRAM, path], timeout=timeout)
            digest = res.text.split(maxsplit=1)[0] if res.text.strip() else ""
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ProtocolError(f"unexpected digest output for {ds_path}: {res.text[:120]!r}")
            return digest
        reader = self.conn.https_reader(streams=4)
        try:
            size = reader.size(ds_path)
            h = hashlib.sha256()
            for _, data in reader.read(ds_path, [(0, size)]):
                h.update(data)
            return h.hexdigest()
        finally:
            reader.close()
            self.conn.refresh_api()

    # -- folders

    def folder_exists(self, ds_path: str) -> bool:
        """Whether the folder ``[ds] dir`` exists (SSH ``test -d``; else the datastore browser)."""
        if self.conn.shell is not None:
            res = self.conn.ssh().run(["test", "-d", vmfs_path(ds_path)], check=False, timeout=60)
            return res.exit_status == 0
        ds, rel = split_ds_path(ds_path)
        parent, name = posixpath.split(rel.rstrip("/"))

        def search() -> bool:
            store = self.conn.datastore_mo(ds)
            if store is None:
                return False
            spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=[name])  # type: ignore[no-untyped-call]
            try:
                task = store.browser.SearchDatastore_Task(datastorePath=f"[{ds}] {parent}", searchSpec=spec)
                result = wait_task(task, 120, f"search {ds_path}")
            except (ApiError, vim.fault.FileNotFound):
                return False
            return any(f.path == name for f in (result.file or []))

        return self.conn.api.call(f"folder {ds_path}", search)

    def list_folder(self, folder: str, pattern: str = "*") -> list[str]:
        """Names of the files in ``[ds] dir`` matching the glob ``pattern`` (not recursive): ``find
        -print0`` over SSH (NUL-separated, so names holding a line break come out whole), else the
        datastore browser."""
        if self.conn.shell is not None:
            res = self.conn.ssh().run(
                ["find", vmfs_path(folder), "-maxdepth", "1", "-type", "f", "-name", pattern, "-print0"],
                timeout=120,
            )
            paths = res.stdout.decode("utf-8", "surrogateescape").split("\0")
            return sorted(posixpath.basename(path) for path in paths if path)

        def search() -> list[str]:
            ds = split_ds_path(folder)[0]
            store = self.conn.datastore_mo(ds)
            if store is None:
                raise EsxiError(f"host {self.conn.name} has no datastore {ds!r}")
            spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=[pattern])  # type: ignore[no-untyped-call]
            task = store.browser.SearchDatastore_Task(datastorePath=folder, searchSpec=spec)
            result = wait_task(task, 120, f"list {folder}")
            return sorted(str(f.path) for f in (result.file or []))

        return self.conn.api.call(f"list {folder}", search)

    def find_in_vm_folders(self, datastores: Sequence[str], pattern: str, depth: int = 1) -> list[str]:
        """Datastore paths of the files matching the glob ``pattern`` in the folders of these datastores
        down to ``depth`` (1: the top-level folders, where VMs keep their files), in one pass per host:
        ``find`` over SSH, else one recursive datastore-browser search per datastore. A datastore that
        cannot be read is skipped, with a warning naming it."""
        if self.conn.shell is not None:
            roots = {vmfs_path(f"[{ds}] "): ds for ds in datastores}
            res = self.conn.ssh().run(
                ["find", *roots, "-maxdepth", str(depth + 1), "-type", "f", "-name", pattern, "-print0"],
                check=False,
                timeout=120,
            )
            if res.exit_status != 0:  # a datastore find could not read; what it could read still counts
                reason = res.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
                log.warning("host %s: searching the VM folders for %s: %s", self.conn.name, pattern,
                            reason[0] if reason else f"find exited {res.exit_status}")  # fmt: skip
            found = []
            for path in res.stdout.decode("utf-8", "surrogateescape").split("\0"):
                root = max((r for r in roots if path.startswith(r)), key=len, default=None)
                rel = path[len(root) :].lstrip("/") if root else ""
                if root and 1 <= rel.count("/") <= depth:
                    found.append(f"[{roots[root]}] {rel}")
            return sorted(found)

        def search() -> list[str]:
            found: list[str] = []
            for ds in datastores:
                store = self.conn.datastore_mo(ds)
                if store is None:
                    continue
                spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=[pattern])  # type: ignore[no-untyped-call]
                try:
                    task = store.browser.SearchDatastoreSubFolders_Task(
                        datastorePath=f"[{ds}]", searchSpec=spec
                    )
                    results = wait_task(task, 120, f"search [{ds}] for {pattern}")
                except (ApiError, vim.fault.FileNotFound) as exc:
                    log.warning("host %s: searching [%s] for %s: %s", self.conn.name, ds, pattern, exc)
                    continue
                for result in results or []:
                    folder = split_ds_path(str(result.folderPath))[1].strip("/")
                    if folder and folder.count("/") < depth:
                        found.extend(f"[{ds}] {folder}/{f.path}" for f in result.file or [])
            return sorted(found)

        return self.conn.api.call(f"search datastores for {pattern}", search)

    def make_directory(self, ds_path: str) -> None:
        """Create the folder ``[ds] dir``; raises :class:`EsxiError` if it already exists (so a caller
        that created it may later delete it as its own)."""
        if self.conn.shell is not None:
            try:
                self.conn.ssh().run(["mkdir", vmfs_path(ds_path)], timeout=60, retry=False)
            except CommandError as exc:
                raise EsxiError(f"cannot create folder {ds_path}: {exc.stderr.strip() or exc}") from exc
            return
        with self.conn.faults(f"create folder {ds_path}"):
            fm = self.conn.api.content.fileManager
            fm.MakeDirectory(name=ds_path, datacenter=self.conn.datacenter(), createParentDirectories=False)

    # -- writing, moving, deleting

    def _file_task(self, what: str, start: Callable[[], Any], timeout: float = 600.0) -> None:
        """Run a FileManager task and wait for it by reading only ``info.state``/``info.error`` (the
        lab's vcsim names the FileManager as the task's ``entity``, which pyvmomi refuses to
        deserialize; the two properties are all we need anyway)."""
        with self.conn.faults(what):
            task = start()
            pc = self.conn.api.content.propertyCollector
            q = vmodl.query.PropertyCollector
            spec = q.FilterSpec(  # type: ignore[no-untyped-call]
                objectSet=[q.ObjectSpec(obj=task)],  # type: ignore[no-untyped-call]
                propSet=[q.PropertySpec(type=vim.Task, pathSet=["info.state", "info.error"])],  # type: ignore[no-untyped-call]
            )
            deadline = time.monotonic() + timeout
            delay = 0.05
            while True:
                props = {p.name: p.val for obj in pc.RetrieveContents([spec]) for p in obj.propSet}
                state = props.get("info.state")
                if state == vim.TaskInfo.State.success:
                    return
                if state == vim.TaskInfo.State.error:
                    raise props["info.error"]
                if time.monotonic() > deadline:
                    raise TaskTimeoutError(f"{what}: task still {state} after {timeout} s", task)
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)

    def delete_path(self, ds_path: str) -> None:
        """Delete a file or a whole folder (no error when it does not exist)."""
        if self.conn.shell is not None:
            self.conn.ssh().run(["rm", "-rf", vmfs_path(ds_path)], timeout=600)
            return
        if not self.file_exists(ds_path) and not self.folder_exists(ds_path):
            return
        with self.conn.faults(f"delete {ds_path}"):
            fm = self.conn.api.content.fileManager
            datacenter = self.conn.datacenter()
        self._file_task(
            f"delete {ds_path}", lambda: fm.DeleteDatastoreFile_Task(name=ds_path, datacenter=datacenter)
        )

    def move_file(self, src: str, dst: str) -> None:
        """Rename a datastore file (replacing ``dst``): ``mv -f`` over SSH, else MoveDatastoreFile."""
        if self.conn.shell is not None:
            self.conn.ssh().run(["mv", "-f", vmfs_path(src), vmfs_path(dst)], timeout=600, retry=False)
            return
        with self.conn.faults(f"move {src}"):
            fm = self.conn.api.content.fileManager
            dc = self.conn.datacenter()
        self._file_task(
            f"move {src}",
            lambda: fm.MoveDatastoreFile_Task(
                sourceName=src, sourceDatacenter=dc, destinationName=dst, destinationDatacenter=dc, force=True
            ),
        )

    def write_file(self, ds_path: str, data: bytes) -> None:
        """Write a small file (.vmx, .nvram, descriptor) atomically: a temporary file next to it, then
        renamed over it, so a reader or a crash never sees half a .vmx."""
        tmp = ds_path + ".esxi-reconciler.tmp"
        if self.conn.shell is not None:
            self.conn.ssh().run(["sh", "-c", 'cat > "$1"', "sh", vmfs_path(tmp)], stdin=data, timeout=120)
        else:
            reader = self.conn.https_reader(streams=1)
            try:
                reader.put_file(tmp, [data], len(data))
            finally:
                reader.close()
        self.move_file(tmp, ds_path)
