"""Which commits are trusted: signatures checked by git itself against the listed keys only.

``git verify-commit`` does the work. SSH signatures are checked against an allowed-signers file written
from the listed SSH keys (``gpg.ssh.allowedSignersFile``; every key gets the principal ``signerN``, so
a name with spaces cannot break the file). OpenPGP signatures are checked in a private ``GNUPGHOME``
holding only the listed public keys, rebuilt from the bootstrap file at every start (a key removed
there is gone), and the signing key's fingerprint must be one of theirs. Nothing from the machine's
own keyrings or git config counts. ``gpg`` is never allowed to start an agent (``--no-autostart``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reconciler.config.source import Signer
from reconciler.gitsource.git import GitError, GitRunner, last_words
from reconciler.printable import printable

_SSH_GOOD = re.compile(r'Good "git" signature for (\S+) with (\S+) key (SHA256:\S+)')
_SSH_KEY = re.compile(r"with (\S+) key (SHA256:[A-Za-z0-9+/=]+)")
_GPG_STATUS = re.compile(r"^\[GNUPG:\] (\S+)(?: (.*))?$", re.MULTILINE)
GPG_TIMEOUT = 30.0


class TrustError(Exception):
    """The listed keys cannot be prepared (a malformed OpenPGP key, gpg missing)."""


@dataclass(frozen=True)
class SignatureCheck:
    """The verdict on one commit: trusted or not, by whom, and one line for people."""

    trusted: bool
    signer: str | None
    detail: str


class Trust:
    """The listed signers, prepared under ``directory`` for ``git verify-commit``."""

    def __init__(self, signers: tuple[Signer, ...], directory: Path) -> None:
        self.signers = signers
        self.directory = directory
        self.allowed_signers = directory / "allowed_signers"
        self.gnupg_home = directory / "gnupg"
        self._principals = {f"signer{n}": s.name for n, s in enumerate(signers, start=1) if s.kind == "ssh"}
        self._fingerprints: dict[str, str] = {}

    @property
    def required(self) -> bool:
        return bool(self.signers)

    def prepare(self) -> None:
        """Write the allowed-signers file and a fresh keyring with exactly the listed keys."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines = [
            f'signer{n} namespaces="git" {s.public_key}\n'
            for n, s in enumerate(self.signers, start=1)
            if s.kind == "ssh"
        ]
        tmp = self.allowed_signers.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.allowed_signers)
        if self.gnupg_home.exists():
            shutil.rmtree(self.gnupg_home)
        self._fingerprints = {}
        openpgp = [s for s in self.signers if s.kind == "openpgp"]
        if not openpgp:
            return
        self.gnupg_home.mkdir(mode=0o700)
        for signer in openpgp:
            for fingerprint in self._import(signer):
                self._fingerprints[fingerprint] = signer.name

    def _gpg(self, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GNUPGHOME": str(self.gnupg_home),
            "LC_ALL": "C",
        }
        try:
            return subprocess.run(
                ["gpg", "--batch", "--no-tty", "--no-autostart", "--quiet", *args],
                input=stdin,
                capture_output=True,
                env=env,
                timeout=GPG_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TrustError(f"cannot run gpg to import the OpenPGP signers: {exc}") from None

    def _import(self, signer: Signer) -> list[str]:
        key = signer.public_key.encode("utf-8")
        shown = self._gpg("--with-colons", "--import-options", "show-only", "--import", stdin=key)
        fingerprints = [
            line.split(":")[9]
            for line in shown.stdout.decode("utf-8", "replace").splitlines()
            if line.startswith("fpr:")
        ]
        if shown.returncode != 0 or not fingerprints:
            why = last_words(shown.stderr) or "no key found"
            raise TrustError(f"signer {signer.name!r}: not a usable OpenPGP public key ({why})")
        imported = self._gpg("--import", stdin=key)
        if imported.returncode != 0:
            raise TrustError(f"signer {signer.name!r}: gpg --import failed: {last_words(imported.stderr)}")
        return fingerprints

    @property
    def git_config(self) -> tuple[str, ...]:
        """The ``-c`` settings git needs to verify (the allowed-signers file)."""
        return (f"gpg.ssh.allowedSignersFile={self.allowed_signers}",)

    @property
    def env(self) -> dict[str, str]:
        """The environment additions git needs to verify (the private keyring)."""
        return {"GNUPGHOME": str(self.gnupg_home)}

    def check(self, runner: GitRunner, commit: str) -> SignatureCheck:
        """Whether ``commit`` is signed by a listed key. ``runner`` must carry :attr:`git_config` and
        :attr:`env`. Raises :class:`GitError` only when git itself cannot run."""
        header = runner.run("cat-file", "commit", commit, what=f"reading commit {commit[:12]}")
        if not re.search(rb"^gpgsig(-sha256)? ", header.stdout.split(b"\n\n", 1)[0], re.MULTILINE):
            return SignatureCheck(False, None, "not signed")
        result = runner.run("verify-commit", "--raw", commit, what="verifying the signature", check=False)
        output = (result.stdout + b"\n" + result.stderr).decode("utf-8", "replace")
        if "-----BEGIN SSH SIGNATURE-----" in header.stdout.decode("utf-8", "replace"):
            return self._ssh_verdict(result.returncode, output)
        return self._openpgp_verdict(result.returncode, output)

    def _ssh_verdict(self, returncode: int, output: str) -> SignatureCheck:
        good = _SSH_GOOD.search(output)
        if returncode == 0 and good is not None and good.group(1) in self._principals:
            name = self._principals[good.group(1)]
            return SignatureCheck(True, name, f"signed by {name} (SSH {good.group(3)})")
        key = _SSH_KEY.search(output)
        which = f" (SSH {key.group(2)})" if key else ""
        if "No principal matched" in output or (key and returncode != 0):
            return SignatureCheck(False, None, f"signed by a key that is not a trusted signer{which}")
        return SignatureCheck(False, None, f"SSH signature not valid{which}: {_one_line(output)}")

    def _openpgp_verdict(self, returncode: int, output: str) -> SignatureCheck:
        status = {m.group(1): (m.group(2) or "") for m in _GPG_STATUS.finditer(output)}
        if "VALIDSIG" in status and "GOODSIG" in status and returncode == 0:
            fields = status["VALIDSIG"].split()
            candidates = [fields[0], fields[-1]] if fields else []
            name = next((self._fingerprints[f] for f in candidates if f in self._fingerprints), None)
            if name is not None:
                return SignatureCheck(True, name, f"signed by {name} (OpenPGP {fields[-1]})")
            return SignatureCheck(
                False, None, f"signed by a key that is not a trusted signer (OpenPGP {fields[-1]})"
            )
        for word, meaning in (
            ("NO_PUBKEY", "signed by a key that is not a trusted signer (OpenPGP key {})"),
            ("EXPKEYSIG", "signed with an expired key ({})"),
            ("REVKEYSIG", "signed with a revoked key ({})"),
            ("EXPSIG", "the signature has expired ({})"),
            ("BADSIG", "bad signature: the commit was changed after signing ({})"),
        ):
            if word in status:
                return SignatureCheck(False, None, meaning.format(status[word].split(" ")[0]))
        if not self._fingerprints:
            return SignatureCheck(False, None, "signed with OpenPGP, but no OpenPGP signer is listed")
        return SignatureCheck(False, None, f"OpenPGP signature not valid: {_one_line(output)}")


def _one_line(text: str) -> str:
    lines = [printable(line.strip()) for line in text.splitlines() if line.strip()]
    joined = "; ".join(lines[-2:])
    return joined[:200] or "no detail"


__all__ = ["GitError", "SignatureCheck", "Trust", "TrustError"]
