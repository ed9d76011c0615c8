"""Secrets by reference: an environment variable, a file, or a systemd credential.

A :class:`Secret` holds only *where* the value is. ``repr``/``str`` show the reference
(``Secret(env:ESXI1_PASSWORD)``), never the value; the value is read each time :meth:`Secret.reveal`
is called and is not kept on the object. Resolution errors (:class:`SecretError`) name the reference
and what is wrong with it, never any part of the content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SecretSource = Literal["env", "file", "credential"]

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"


class SecretError(Exception):
    """A secret reference cannot be resolved; the message names the reference, never a value."""


@dataclass(frozen=True, repr=False)
class Secret:
    """A reference to a secret value kept outside the configuration."""

    source: SecretSource
    """env, file or credential."""
    name: str
    """The environment variable, absolute file path or systemd credential name."""

    def __repr__(self) -> str:
        return f"Secret({self.source}:{self.name})"

    __str__ = __repr__

    @classmethod
    def from_reference(cls, reference: dict[str, str]) -> Secret:
        """Build from a validated ``{env|file|credential: NAME}`` mapping."""
        ((source, name),) = reference.items()
        if source not in ("env", "file", "credential"):
            raise ValueError(f"unknown secret source {source!r}")
        return cls(source, name)  # type: ignore[arg-type]

    def reveal_bytes(self) -> bytes:
        """Read the secret now. Raises :class:`SecretError`."""
        if self.source == "env":
            value = os.environ.get(self.name)
            if value is None:
                raise SecretError(f"{self}: environment variable {self.name} is not set")
            data = value.encode("utf-8", "surrogateescape")
        elif self.source == "file":
            data = _read_private_file(self, Path(self.name), check_mode=True)
        else:
            directory = os.environ.get(CREDENTIALS_DIRECTORY)
            if not directory:
                raise SecretError(
                    f"{self}: ${CREDENTIALS_DIRECTORY} is not set; run under systemd with"
                    f" LoadCredential={self.name}:/path/to/file, or use {{file: /path}} instead"
                )
            # systemd makes credential files private to the service; no mode check needed.
            data = _read_private_file(self, Path(directory, self.name), check_mode=False)
        if not data:
            raise SecretError(f"{self}: the secret is empty")
        return data

    def reveal(self) -> str:
        """The secret as text (UTF-8). Raises :class:`SecretError`."""
        data = self.reveal_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"{self}: the secret is not valid UTF-8 text") from None

    def check(self) -> None:
        """Raise :class:`SecretError` if the secret cannot be read now (the value is discarded)."""
        self.reveal_bytes()


def _read_private_file(secret: Secret, path: Path, *, check_mode: bool) -> bytes:
    try:
        # O_NONBLOCK: a FIFO in place of the file must not hang the daemon; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise SecretError(f"{secret}: {path} is not a regular file")
            if check_mode and mode & 0o077:
                raise SecretError(
                    f"{secret}: {path} is readable or writable by group or others (mode"
                    f" {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
                )
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
    except OSError as error:
        raise SecretError(f"{secret}: cannot read {path}: {error.strerror or type(error).__name__}") from None
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data
