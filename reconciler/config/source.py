"""The bootstrap file of ``run --source``: where the daemon fetches its config from, and whom it trusts.

One ``GitSource`` document (:data:`~reconciler.config.schemas.SOURCE_KIND`, schema in
:mod:`.schemas`), read with the same safe YAML reader and worded errors as the config directory and
loaded into a frozen :class:`GitSourceSpec`. It is kept apart from the config it points to on purpose
(the chicken-and-egg question of GitOps): if the fetched config could say where it comes from or which
signing keys count, whoever can push a commit could also disable the check that was meant to stop them.
Flux answers the same way with its bootstrap: the first source is installed from outside the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

from reconciler.config import schemas
from reconciler.config.documents import Document, read_file
from reconciler.config.errors import ConfigError, ConfigIssue
from reconciler.config.model import Source
from reconciler.config.secrets import Secret
from reconciler.config.validation import apply_defaults, validate_document

SignerKind = Literal["ssh", "openpgp"]
Scheme = Literal["ssh", "https", "file"]


def url_scheme(url: str) -> Scheme:
    """The transport of a (valid) source URL."""
    if url.startswith("file://"):
        return "file"
    return "https" if url.startswith(("https://", "http://")) else "ssh"  # http:// is refused at load


@dataclass(frozen=True)
class Signer:
    """A key whose signatures on commits are trusted."""

    name: str
    kind: SignerKind
    public_key: str
    """An OpenSSH public key line, or an ASCII-armoured OpenPGP public key."""


@dataclass(frozen=True)
class SshAccess:
    """The deploy key (a secret reference) and the pinned host keys of an SSH remote."""

    private_key: Secret
    host_keys: tuple[str, ...]
    """``TYPE BASE64`` each (comments dropped)."""


@dataclass(frozen=True)
class HttpsAccess:
    """How an HTTPS remote is reached: optional Basic credentials (the token by reference) and an
    optional CA to trust instead of the system's."""

    username: str | None
    token: Secret | None
    ca_file: Path | None
    """A PEM file of the CA certificate(s) that sign the server's certificate."""


@dataclass(frozen=True)
class GitSourceSpec:
    """Where the config comes from: one branch or tag of one git remote."""

    name: str
    url: str
    branch: str | None
    tag: str | None
    path: str
    """Sub-directory of the repository holding the config; ``""`` for the top."""
    interval: timedelta
    timeout: timedelta
    ssh: SshAccess | None
    https: HttpsAccess | None
    signers: tuple[Signer, ...]
    allow_rollback: bool
    source: Source = field(compare=False)

    @property
    def ref(self) -> str:
        """The full ref fetched: ``refs/heads/<branch>`` or ``refs/tags/<tag>``."""
        return f"refs/heads/{self.branch}" if self.branch is not None else f"refs/tags/{self.tag}"

    @property
    def ref_name(self) -> str:
        """How people name it: ``branch main`` or ``tag v1``."""
        return f"branch {self.branch}" if self.branch is not None else f"tag {self.tag}"

    @property
    def verify(self) -> bool:
        """Whether only signed commits are applied."""
        return bool(self.signers)

    @property
    def scheme(self) -> Scheme:
        """The transport: ``ssh`` (ssh:// or scp-like), ``https`` or ``file``."""
        return url_scheme(self.url)

    @property
    def display_url(self) -> str:
        """The URL as shown in status and logs (it holds no secret: keys and tokens are by reference,
        and a URL with credentials in it is refused at load)."""
        return self.url


def _ref_problem(name: str) -> str | None:
    """Why ``name`` cannot be a branch or tag name (a subset of git check-ref-format), or None."""
    bad = (
        name.startswith(("-", "/", "."))
        or name.endswith(("/", ".", ".lock"))
        or ".." in name
        or "//" in name
        or "@{" in name
        or any(c in name for c in " ~^:?*[\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    return f"{name!r} is not a valid git branch or tag name" if bad else None


def _path_problem(path: str) -> str | None:
    parts = PurePosixPath(path).parts if path else ()
    if any(part in ("..", ".") for part in parts) or "\\" in path:
        return f"{path!r} must stay inside the repository (no . or .. components)"
    return None


def _without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for messages about it)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"***@{host}").geturl() if "@" in parts.netloc else url


def _url_problem(url: str) -> str | None:
    if url.startswith("http://"):
        return (
            f"{url!r}: plain http:// is refused (the config and any token would travel unauthenticated"
            " and in clear); use the https:// URL of the repository"
        )
    if url.startswith("https://"):
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            return f"{_without_userinfo(url)!r} has an invalid port"
        if "@" in parts.netloc:
            return (
                f"{_without_userinfo(url)!r} holds credentials in the URL; remove the 'user:…@' part and"
                " give spec.https.username and spec.https.token (a secret reference: env, file or"
                " credential)"
            )
        if not parts.hostname or parts.path in ("", "/"):
            return f"{url!r} needs a host and a path: https://git.example.com/infra/esxi.git"
        return None
    if url.startswith("ssh://"):
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            return f"{url!r} has an invalid port"
        if not parts.hostname or not parts.username:
            return f"{url!r} needs a user and a host: ssh://git@git.example.com/infra/esxi.git"
    return None


def _ca_problem(path: Path) -> str | None:
    """Why ``path`` cannot be the CA of an HTTPS remote, or None."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        return f"cannot read {str(path)!r}: {exc.strerror or exc}; give the PEM file of the server's CA"
    if b"-----BEGIN CERTIFICATE-----" not in text:
        return f"{str(path)!r} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the CA's PEM file"
    return None


def _issue(doc: Document, path: tuple[str, ...], message: str) -> ConfigIssue:
    return doc.issue(path, message)


def _signers(doc: Document, entries: list[dict[str, object]], issues: list[ConfigIssue]) -> list[Signer]:
    """``spec.verify.signers``: each with its name (``signer-N`` when unnamed); two of one name is an
    issue."""
    signers: list[Signer] = []
    for number, raw in enumerate(entries, start=1):
        kind: SignerKind = "ssh" if "ssh" in raw else "openpgp"
        key = str(raw[kind]).strip()
        if kind == "ssh":
            key = " ".join(key.split()[:2])
        signers.append(Signer(str(raw.get("name") or f"signer-{number}"), kind, key))
    names = [s.name for s in signers]
    for number, name in enumerate(names):
        if name in names[:number]:
            issues.append(
                _issue(doc, ("spec", "verify", "signers"), f"two signers are named {name!r}; rename one")
            )
    return signers


def _transport_issues(
    doc: Document, scheme: Scheme, ssh_spec: object, https_spec: object
) -> list[ConfigIssue]:
    """The access blocks that do not fit the URL's transport (or the one an SSH URL lacks)."""
    issues = []
    if scheme == "ssh" and ssh_spec is None:
        issues.append(
            _issue(
                doc,
                ("spec", "url"),
                "an SSH remote needs spec.ssh: private_key (the deploy key, by reference) and host_keys"
                " (ssh-keyscan HOST)",
            )
        )
    if scheme == "file" and ssh_spec is not None:
        issues.append(_issue(doc, ("spec", "ssh"), "has no effect on a file:// URL; remove it"))
    if scheme == "https" and ssh_spec is not None:
        issues.append(
            _issue(
                doc,
                ("spec", "ssh"),
                "is for SSH remotes, not an https:// URL; use spec.https or an ssh:// URL",
            )
        )
    if scheme != "https" and https_spec is not None:
        issues.append(
            _issue(
                doc,
                ("spec", "https"),
                f"is for https:// URLs, not a {scheme} remote; remove it or give the repository's"
                " https:// URL",
            )
        )
    return issues


def _https_access(doc: Document, https_spec: dict[str, object], issues: list[ConfigIssue]) -> HttpsAccess:
    """The ``spec.https`` block; what is wrong with it goes to ``issues``."""
    ca_file = Path(str(https_spec["ca_file"])) if "ca_file" in https_spec else None
    if ca_file is not None:
        problem = _ca_problem(ca_file)
        if problem:
            issues.append(_issue(doc, ("spec", "https", "ca_file"), problem))
    token = https_spec.get("token")
    username = https_spec.get("username")
    if username is not None and any(ord(c) < 32 or ord(c) == 127 for c in str(username)):
        issues.append(_issue(doc, ("spec", "https", "username"), "must not hold control characters"))
    return HttpsAccess(
        username=str(username) if username is not None else None,
        token=Secret.from_reference(token) if isinstance(token, dict) else None,
        ca_file=ca_file,
    )


def _build(doc: Document, data: dict[str, object]) -> tuple[GitSourceSpec | None, list[ConfigIssue]]:
    from reconciler.config.loader import parse_interval

    spec: dict[str, object] = data["spec"]  # type: ignore[assignment]
    issues: list[ConfigIssue] = []
    url = str(spec["url"])
    problem = _url_problem(url)
    if problem:
        issues.append(_issue(doc, ("spec", "url"), problem))
    for key in ("branch", "tag"):
        if key in spec:
            problem = _ref_problem(str(spec[key]))
            if problem:
                issues.append(_issue(doc, ("spec", key), problem))
    path = str(spec["path"]).strip("/")
    problem = _path_problem(path)
    if problem:
        issues.append(_issue(doc, ("spec", "path"), problem))
    ssh_spec = spec.get("ssh")
    https_spec = spec.get("https")
    scheme = url_scheme(url)
    issues += _transport_issues(doc, scheme, ssh_spec, https_spec)
    https = _https_access(doc, https_spec, issues) if isinstance(https_spec, dict) else None
    interval = parse_interval(str(spec["interval"]))
    timeout = parse_interval(str(spec["timeout"]))
    if interval < timedelta(seconds=1):
        issues.append(_issue(doc, ("spec", "interval"), "must be at least 1s"))
    if timeout < timedelta(seconds=1):
        issues.append(_issue(doc, ("spec", "timeout"), "must be at least 1s"))
    verify = spec.get("verify")
    signers = _signers(doc, verify["signers"], issues) if isinstance(verify, dict) else []
    ssh = None
    if isinstance(ssh_spec, dict):
        ssh = SshAccess(
            private_key=Secret.from_reference(ssh_spec["private_key"]),
            host_keys=tuple(" ".join(str(k).split()[:2]) for k in ssh_spec["host_keys"]),
        )
    if issues:
        return None, issues
    metadata: dict[str, object] = data["metadata"]  # type: ignore[assignment]
    return (
        GitSourceSpec(
            name=str(metadata["name"]),
            url=url,
            branch=str(spec["branch"]) if "branch" in spec else None,
            tag=str(spec["tag"]) if "tag" in spec else None,
            path=path,
            interval=interval,
            timeout=timeout,
            ssh=ssh,
            https=https,
            signers=tuple(signers),
            allow_rollback=bool(spec["allow_rollback"]),
            source=Source(doc.file, doc.node.start_mark.line + 1),
        ),
        [],
    )


def load_source(path: str | os.PathLike[str]) -> GitSourceSpec:
    """Load the bootstrap file at ``path`` (one ``GitSource`` document). Raises :class:`ConfigError`
    with every issue, located like the config's (``source.yaml:7:3 spec.url: …``)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError([ConfigIssue(str(file), 0, 0, "", "source file does not exist (or is not a file)")])
    _raw, documents, issues = read_file(file, str(file))
    if issues:
        raise ConfigError(issues)
    if len(documents) != 1:
        found = f"{len(documents)} documents" if documents else "no document"
        message = f"expected exactly one {schemas.SOURCE_KIND} document, found {found}"
        raise ConfigError([ConfigIssue(str(file), 0, 0, "", message)])
    (doc,) = documents
    kind, problems = validate_document(doc, kinds=(schemas.SOURCE_KIND,))
    if problems or kind is None:
        raise ConfigError(problems)
    spec, problems = _build(doc, apply_defaults(kind, doc.data))
    if spec is None:
        raise ConfigError(problems)
    return spec
