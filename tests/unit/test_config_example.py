"""config.example/ validates; schemas/ and docs/config.md are exactly what the code generates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from reconciler.config import load_config, schemas
from reconciler.config.docgen import render
from reconciler.rules import schedule

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example"


def test_config_example_validates() -> None:
    desired = load_config(EXAMPLE)
    assert desired.warnings == ()
    assert list(desired.hosts) == ["esxi1", "esxi2"]
    assert {h.license.value for h in desired.hosts.values()} == {"free", "licensed"}
    assert list(desired.repositories) == ["cloud", "nas", "offsite"]
    assert desired.repository("cloud").backend.type == "s3"
    assert [(c.source, c.destination) for c in desired.copy_policies.values()] == [("nas", "cloud")]
    assert all(r.encryption.enabled and r.encryption.key for r in desired.repositories.values())
    assert len(desired.policies) == 3
    # The same VM is protected twice: nightly to the NAS and weekly to the second repository.
    web01 = desired.policies_for_vm("esxi1", "web01")
    assert [(p.repository, type(p.schedule.spec)) for p in web01] == [
        ("nas", schedule.Daily),
        ("offsite", schedule.Weekly),
    ]
    assert len(desired.verify_policies) == 2


def test_config_example_uses_every_kind() -> None:
    kinds = set()
    for path in EXAMPLE.rglob("*.yaml"):
        kinds |= {doc["kind"] for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert kinds == set(schemas.KINDS)


def test_schema_files_are_up_to_date() -> None:
    expected = schemas.rendered()
    actual = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "schemas").glob("*.json")}
    assert actual == expected, "run: python -m reconciler.config.docgen --schemas schemas/"


def test_docs_are_up_to_date() -> None:
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render(), "run: python -m reconciler.config.docgen > docs/config.md"


def _walk(schema: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(schema, dict):
        found.append((where, schema))
        for key, value in schema.items():
            found.extend(_walk(value, f"{where}/{key}"))
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            found.extend(_walk(value, f"{where}/{index}"))
    return found


@pytest.mark.parametrize("name", sorted(schemas.rendered()))
def test_schema_conventions(name: str) -> None:
    schema = json.loads(schemas.rendered()[name])
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for where, sub in _walk(schema, "#"):
        if where == "#" and name == "esxi-reconciler.schema.json":
            continue  # open on purpose: the kind's own schema (in allOf) closes it
        if "properties" in sub and sub.get("type") == "object":
            assert sub.get("additionalProperties") is False, where
            for field, field_schema in sub["properties"].items():
                if where.endswith(("/if", "/then", "/else")) or "/if/" in where:
                    continue
                assert field_schema.get("description"), f"{where}/properties/{field} has no description"


@pytest.mark.parametrize("path", sorted(EXAMPLE.rglob("*.yaml")), ids=lambda p: p.name)
def test_committed_schemas_accept_the_example(path: Path) -> None:
    """What an editor sees: the committed schema files, used by plain jsonschema, accept the example."""
    combined = json.loads((REPO / "schemas" / "esxi-reconciler.schema.json").read_text())
    for doc in yaml.safe_load_all(path.read_text()):
        own = json.loads((REPO / "schemas" / schemas.file_name(doc["kind"])).read_text())
        for schema in (own, combined):
            errors = [e.message for e in Draft202012Validator(schema).iter_errors(doc)]
            assert errors == [], f"{path.name}: {errors}"


def test_combined_schema_rejects_by_kind() -> None:
    combined = json.loads((REPO / "schemas" / "esxi-reconciler.schema.json").read_text())
    validator = Draft202012Validator(combined)
    assert not validator.is_valid(
        {"kind": "Host", "apiVersion": "esxi-reconciler/v1", "metadata": {}, "spec": {}}
    )
    assert not validator.is_valid({"kind": "Nope"})
