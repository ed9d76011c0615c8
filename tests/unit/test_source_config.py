"""The bootstrap file of ``run --source``: a GitSource document, checked like the config, and refused
inside a config directory."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from reconciler.config import ConfigError, load_config
from reconciler.config.source import load_source

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN3qh4g6Opf3biTMmUnKvVfeAwM1goe51XxHtp6SBFxa"
SIGNER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJmMnr0SgKZfVZzDZ8J7qN2Xn6XzEJ7pUu8x1Ew8wYB alice@example"

SOURCE = f"""\
apiVersion: esxi-reconciler/v1
kind: GitSource
metadata: {{name: config}}
spec:
  url: ssh://git@git.example.com:2222/infra/esxi-config.git
  branch: main
  path: esxi/
  interval: 30s
  ssh:
    private_key: {{file: /etc/esxi-reconciler/credentials/deploy-key}}
    host_keys: ["{HOST_KEY} git.example.com"]
  verify:
    signers:
      - {{name: alice, ssh: "{SIGNER}"}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "source.yaml"
    path.write_text(text)
    return path


def issues(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_source(write(tmp_path, text))
    return [str(issue) for issue in error.value.issues]


def test_a_complete_source_loads_with_defaults_filled(tmp_path: Path) -> None:
    spec = load_source(write(tmp_path, SOURCE))
    assert spec.url == "ssh://git@git.example.com:2222/infra/esxi-config.git"
    assert spec.ref == "refs/heads/main" and spec.ref_name == "branch main"
    assert spec.path == "esxi"
    assert spec.interval == timedelta(seconds=30) and spec.timeout == timedelta(minutes=2)
    assert spec.ssh is not None and spec.ssh.host_keys == (HOST_KEY,)  # the comment is dropped
    assert str(spec.ssh.private_key) == "Secret(file:/etc/esxi-reconciler/credentials/deploy-key)"
    assert [(s.name, s.kind) for s in spec.signers] == [("alice", "ssh")]
    assert spec.signers[0].public_key == " ".join(SIGNER.split()[:2])
    assert spec.verify and not spec.allow_rollback


def test_a_file_url_needs_no_ssh_and_a_tag_can_be_followed(tmp_path: Path) -> None:
    text = """\
apiVersion: esxi-reconciler/v1
kind: GitSource
metadata: {name: local}
spec: {url: "file:///srv/git/esxi.git", tag: production}
"""
    spec = load_source(write(tmp_path, text))
    assert spec.scheme == "file" and spec.ref == "refs/tags/production" and spec.path == ""
    assert spec.interval == timedelta(minutes=1) and not spec.verify


def test_every_mistake_is_reported_with_its_place(tmp_path: Path) -> None:
    text = """\
apiVersion: esxi-reconciler/v1
kind: GitSource
metadata: {name: config}
spec:
  url: ftp://example.com/x.git
  branch: main
  tag: v1
  intervall: 1m
  verify: {signers: [{ssh: "not a key"}]}
"""
    found = issues(tmp_path, text)
    path = str(tmp_path / "source.yaml")
    expected = [
        f"{path}:5:3 spec.url: 'ftp://example.com/x.git' is not a git URL over SSH",
        "spec: takes exactly one of branch, tag; found branch and tag",
        "8:3 spec.intervall: unknown field 'intervall'; did you mean 'interval'?",
        "spec.verify.signers[0].ssh: 'not a key' is not an OpenSSH public key line",
    ]
    for text in expected:
        assert any(text in i for i in found), text


def test_an_ssh_url_without_deploy_key_and_host_keys_is_refused(tmp_path: Path) -> None:
    text = SOURCE.split("  ssh:\n")[0].replace("path: esxi/", "path: ../etc")
    found = issues(tmp_path, text)
    assert any("spec.url: an SSH remote needs spec.ssh: private_key" in i for i in found)
    assert any("spec.path: '../etc' must stay inside the repository" in i for i in found)


def test_a_plaintext_deploy_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    text = SOURCE.replace(
        "{file: /etc/esxi-reconciler/credentials/deploy-key}", '"-----BEGIN OPENSSH PRIVATE KEY----- secret"'
    )
    found = issues(tmp_path, text)
    assert any("spec.ssh.private_key" in i for i in found)
    assert not any("secret" in i.split("private_key", 1)[1] and "BEGIN" in i for i in found)


def test_bad_branch_names_and_two_documents_are_refused(tmp_path: Path) -> None:
    assert any(
        "spec.branch: 'main..x' is not a valid git branch or tag name" in i
        for i in issues(tmp_path, SOURCE.replace("branch: main", "branch: main..x"))
    )
    assert issues(tmp_path, SOURCE + "---\n" + SOURCE) == [
        f"{tmp_path / 'source.yaml'} expected exactly one GitSource document, found 2 documents"
    ]
    with pytest.raises(ConfigError, match="source file does not exist"):
        load_source(tmp_path / "nope")


def test_a_config_directory_cannot_say_where_it_comes_from(tmp_path: Path) -> None:
    """A commit that could change the source or the trusted keys could disable the check meant to stop it."""
    directory = tmp_path / "config"
    directory.mkdir()
    (directory / "source.yaml").write_text(SOURCE)
    with pytest.raises(ConfigError) as error:
        load_config(directory)
    assert [str(i) for i in error.value.issues] == [
        "source.yaml:2:1 kind: a GitSource belongs in the bootstrap file given to `esxi-reconciler run"
        " --source FILE`, not in the config it fetches (a commit must not be able to change where the config"
        " comes from or whose signatures are trusted); move this document there"
    ]


def test_a_kind_of_the_config_directory_is_not_a_source(tmp_path: Path) -> None:
    text = SOURCE.replace("kind: GitSource", "kind: Repository")
    found = issues(tmp_path, text)
    assert any("kind: unknown kind 'Repository'; expected one of GitSource" in i for i in found)


@pytest.mark.usefixtures("restore_logging")
def test_run_refuses_a_bad_source_file_and_a_second_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler import cli

    bad = write(tmp_path, SOURCE.replace("interval: 30s", "interval: soon"))
    state = ["--state-dir", str(tmp_path / "state")]
    assert cli.main(["run", "--once", "--source", str(bad), *state]) == 78
    assert "spec.interval: 'soon' is not a duration such as 30s" in capsys.readouterr().err
    good = write(tmp_path, SOURCE)
    assert cli.main(["--config", str(tmp_path), "run", "--source", str(good), *state]) == 64
    assert "give either --config DIR or --source FILE, not both" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


HTTPS_SOURCE = """\
apiVersion: esxi-reconciler/v1
kind: GitSource
metadata: {name: config}
spec:
  url: https://git.example.com:8443/infra/esxi-config.git
  branch: main
  https:
    username: x-access-token
    token: {credential: git-token}
"""


def test_an_https_source_loads_with_its_token_by_reference(tmp_path: Path) -> None:
    spec = load_source(write(tmp_path, HTTPS_SOURCE))
    assert spec.scheme == "https" and spec.ssh is None and spec.https is not None
    assert spec.https.username == "x-access-token" and str(spec.https.token) == "Secret(credential:git-token)"
    assert spec.https.ca_file is None
    public = HTTPS_SOURCE.split("  https:\n")[0]
    spec = load_source(write(tmp_path, public))  # a public repository needs no credentials
    assert spec.scheme == "https" and spec.https is None


def test_an_https_ca_file_must_be_a_pem_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    text = HTTPS_SOURCE + f"    ca_file: {ca}\n"
    found = issues(tmp_path, text)
    assert any("10:5 spec.https.ca_file: cannot read '" in i for i in found), found
    assert any("': No such file or directory; give the PEM file of the server's CA" in i for i in found)
    ca.write_text("not a certificate")
    assert any("holds no PEM certificate" in i for i in issues(tmp_path, text))
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    spec = load_source(write(tmp_path, text))
    assert spec.https is not None and spec.https.ca_file == ca


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("https://git.example.com:8443", "http://git.example.com"),
            "spec.url: 'http://git.example.com/infra/esxi-config.git': plain http:// is refused (the config"
            " and any token would travel unauthenticated and in clear); use the https:// URL",
        ),
        (
            ("https://git.example.com:8443", "https://bob:glpat-Sup3rS3cret@git.example.com"),
            "spec.url: 'https://***@git.example.com/infra/esxi-config.git' holds credentials in the URL;"
            " remove the 'user:…@' part and give spec.https.username and spec.https.token",
        ),
        (
            ("https://git.example.com:8443/", "ssh://git@git.example.com/"),
            "7:3 spec.https: is for https:// URLs, not a ssh remote",
        ),
        (
            ("  https:\n", f"  ssh: {{private_key: {{env: K}}, host_keys: ['{HOST_KEY}']}}\n  https:\n"),
            "spec.ssh: is for SSH remotes, not an https:// URL; use spec.https or an ssh:// URL",
        ),
        (("    token: {credential: git-token}\n", ""), "spec.https: 'username' needs 'token' too"),
        (("token: {credential: git-token}", 'token: "glpat-Sup3rS3cret"'), "spec.https.token"),
    ],
    ids=["http", "token-in-url", "https-on-ssh", "ssh-on-https", "user-without-token", "plaintext-token"],
)
def test_https_mistakes_are_refused_with_the_fix_and_no_token(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    found = issues(tmp_path, HTTPS_SOURCE.replace(*change))
    assert any(expected in i for i in found), found
    assert not any("Sup3rS3cret" in i for i in found)


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_source_example_loads(tmp_path: Path) -> None:
    text = README.read_text()
    block = text.split("# /etc/esxi-reconciler/source.yaml\n", 1)[1].split("```", 1)[0]
    spec = load_source(write(tmp_path, block))
    assert spec.ssh is not None and spec.verify and spec.path == "esxi"
    assert [s.kind for s in spec.signers] == ["ssh", "openpgp"]


def test_the_readme_https_example_loads(tmp_path: Path) -> None:
    text = README.read_text()
    block = text.split("# /etc/esxi-reconciler/source-https.yaml\n", 1)[1].split("```", 1)[0]
    ca = tmp_path / "git-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    spec = load_source(write(tmp_path, block.replace("/etc/esxi-reconciler/git-ca.pem", str(ca))))
    assert spec.scheme == "https" and spec.https is not None and spec.https.ca_file == ca
    assert str(spec.https.token) == "Secret(credential:git-token)"


def test_the_readme_ci_step_is_valid_shell(tmp_path: Path) -> None:
    import subprocess

    text = README.read_text()
    step = text.split('# CI step "esxi-reconciler plan"', 1)[1].split("```", 1)[0]
    script = tmp_path / "step.sh"
    script.write_text("#!/bin/sh\n" + step)
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True, check=False).returncode == 0
    assert "plan --revision HEAD --against" in step and "--format markdown" in step
