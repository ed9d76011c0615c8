"""Secrets must never appear in clear: a registry of every secret the suite's fixtures create, checked
against everything the product said and wrote.

* **Secrets** (:meth:`SecretScan.secret`): host passwords, SSH private keys, repository passphrases, a
  git source's deploy key or HTTPS token, notifier secrets (SMTP passwords, ntfy/Gotify/webhook tokens,
  as given and URL-encoded) — registered by the fixtures, most simply with
  :meth:`SecretScan.watch_config`, which reveals every secret reference of a config, and
  :meth:`SecretScan.watch_source` for a ``run --source`` file — and, at the end,
  each watched repository's master key (unwrapped with its passphrase), since that must not be in
  clear either.
* **Output** (:meth:`SecretScan.output`): what the product printed and logged. The conftest feeds it
  every test's captured stdout, stderr and log records (what ``capsys.readouterr()`` returned and what
  was left unread), and tests feed it the output of the processes they start (the daemon).
* **Files** (:meth:`SecretScan.directory`): the state directories (status database: plans, actions,
  conditions, the event log with every notification's result), repositories (their unencrypted files:
  config, key files, locks, staging) and export directories a test used, scanned at the end of the
  session.

A secret is looked for as its bytes, as it reads inside a JSON string, and, for a multi-line key,
line by line (each base64 line of a PEM/OpenSSH body is distinctive). Every place it is found is a
:class:`Finding`; the suite's figure ``secrets_found`` is their number and must be 0.

Also here: :func:`private_files`, the check that the files holding a key or credential which the tool
creates are readable by their owner only.
"""

from __future__ import annotations

import base64
import json
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

MIN_SECRET = 8
"""Shorter values are not registered: they would be found by chance."""
MAX_FILE = 256 << 20
"""Larger files (disk images) are scanned in their first and last MiB only."""


@dataclass(frozen=True)
class Finding:
    what: str
    """Which secret (its description, never its value)."""
    where: str


def _forms(value: bytes) -> list[bytes]:
    forms = {value}
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        forms.add(value.hex().encode())
        forms.add(base64.b64encode(value))
    else:
        forms.add(json.dumps(text)[1:-1].encode())
        if "\n" in text.strip():  # a key file: each distinctive line on its own
            forms.update(line.strip().encode() for line in text.splitlines() if len(line.strip()) >= 20)
    return sorted(f for f in forms if len(f) >= MIN_SECRET)


class SecretScan:
    """The registry of one test session (thread-safe: readers of process output run in threads)."""

    def __init__(self) -> None:
        self._secrets: dict[bytes, str] = {}
        self._directories: dict[Path, str] = {}
        self._repositories: dict[Path, bytes] = {}
        self._lock = threading.Lock()
        self.findings: list[Finding] = []
        self.scanned_outputs = 0
        self.scanned_files = 0
        self.active = False
        """Whether a test of the suite runs now (the conftest scans what it reads only then)."""

    # -- what is secret

    def secret(self, value: str | bytes, what: str) -> None:
        data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        with self._lock:
            for form in _forms(data.strip()):
                self._secrets.setdefault(form, what)

    def watch_config(self, config: Path, state: Path | None = None) -> None:
        """Register every secret the config references (revealed now), and its repositories (and the
        state directory) for the final scan."""
        from reconciler.config import load_config

        desired = load_config(config)
        for host in desired.hosts.values():
            self.secret(host.credentials.password.reveal(), f"password of host {host.name}")
            if host.ssh.private_key is not None:
                self.secret(host.ssh.private_key.reveal(), f"SSH private key of host {host.name}")
        for repo in desired.repositories.values():
            path = Path(repo.backend.path)
            self.directory(path, f"repository {repo.name}")
            if repo.encryption.key is not None:
                passphrase = repo.encryption.key.reveal()
                self.secret(passphrase, f"passphrase of repository {repo.name}")
                with self._lock:
                    self._repositories[path] = passphrase.encode()
        for notifier in desired.notifiers.values():
            for placeholder, secret in notifier.secrets.items():
                value, what = secret.reveal(), f"secret {{{placeholder}}} of notifier {notifier.name}"
                self.secret(value, what)
                # as it is written into the apprise URL: a leaked URL holds this form
                self.secret(quote(value, safe=""), f"{what} (URL-encoded)")
        if state is not None:
            self.directory(state, "state directory")

    def watch_source(self, source: Path, state: Path | None = None) -> None:
        """Register the secrets of a ``run --source`` bootstrap file (revealed now): the SSH deploy key
        or the HTTPS token (and the state directory, which holds the clone, for the final scan)."""
        from reconciler.config.source import load_source

        spec = load_source(source)
        if spec.ssh is not None:
            self.secret(spec.ssh.private_key.reveal(), f"deploy key of git source {spec.name}")
        if spec.https is not None and spec.https.token is not None:
            self.secret(spec.https.token.reveal().strip(), f"HTTPS token of git source {spec.name}")
        if state is not None:
            self.directory(state, "state directory")

    def directory(self, path: Path, what: str) -> None:
        with self._lock:
            self._directories.setdefault(Path(path), what)

    # -- looking

    def _search(self, data: bytes, where: str) -> list[Finding]:
        with self._lock:
            secrets = list(self._secrets.items())
        found = [Finding(what, where) for form, what in secrets if form in data]
        unique = list(dict.fromkeys(found))
        with self._lock:
            self.findings.extend(unique)
        return unique

    def output(self, text: str | bytes, where: str) -> list[Finding]:
        """Scan what the product printed or logged; returns (and keeps) what was found."""
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        with self._lock:
            self.scanned_outputs += 1
        return self._search(data, where)

    def _file(self, path: Path, where: str) -> list[Finding]:
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                if size <= MAX_FILE:
                    data = f.read()
                else:
                    data = f.read(1 << 20)
                    f.seek(size - (1 << 20))
                    data += f.read()
        except OSError:
            return []
        self.scanned_files += 1
        return self._search(data, where)

    def master_keys(self) -> None:
        """Register the master key of every watched encrypted repository (unwrapped with its
        passphrase): neither it nor its hex or base64 may be in clear anywhere."""
        from reconciler.repository.crypto import KeyFile
        from reconciler.repository.errors import RepositoryError

        with self._lock:
            repositories = dict(self._repositories)
        for path, passphrase in repositories.items():
            for key_file in sorted((path / "keys").glob("*.json")):
                try:
                    master = KeyFile.from_json(key_file.read_bytes(), str(key_file)).unwrap(passphrase)
                except (OSError, RepositoryError):
                    continue
                self.secret(master.material, f"master key of the repository at {path}")
                self.secret(master.material.hex(), f"master key (hex) of the repository at {path}")
                self.secret(base64.b64encode(master.material), f"master key (base64) of {path}")

    def scan_directory(self, directory: Path, what: str) -> list[Finding]:
        """Scan every file under ``directory`` (or the file itself) now: for what goes away before the end
        of the session (a lab's datastores)."""
        found: list[Finding] = []
        if not directory.exists():
            return found
        files = [directory] if directory.is_file() else sorted(directory.rglob("*"))
        for path in files:
            if path.is_file() and not path.is_symlink():
                found += self._file(path, f"{what}: {path}")
        return found

    def scan_directories(self) -> list[Finding]:
        """Scan every file under the registered directories (that still exist)."""
        self.master_keys()
        with self._lock:
            directories = dict(self._directories)
        found: list[Finding] = []
        for directory, what in sorted(directories.items()):
            found += self.scan_directory(directory, what)
        return found


def private_files(paths: Iterable[Path]) -> list[str]:
    """Those of ``paths`` that group or others may read or write: ``path (mode 0644)``."""
    loose = []
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{path} (mode {mode:04o})")
    return loose
