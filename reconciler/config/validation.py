"""Checking documents against the kind schemas, with every error located and worded for a person.

jsonschema's ``iter_errors`` gives *all* errors of a document; each is mapped through its
``absolute_path`` to the YAML node, so the message names file, line, column and field. Messages are
rewritten where jsonschema's own would be unhelpful (a raw regex, a repr of a whole mapping) or
unsafe: nothing under a ``writeOnly`` (secret) field ever shows its value, and values of mappings and
lists are never printed at all.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from yaml.nodes import ScalarNode

from reconciler.config import schemas
from reconciler.config.documents import Document, PathElement
from reconciler.config.errors import ConfigIssue

Schema = dict[str, Any]

YAML11_TRUE = frozenset({"yes", "y", "on", "true"})
YAML11_FALSE = frozenset({"no", "n", "off", "false"})

REFERENCE_HOWTO = (
    "reference it instead: {env: NAME} (environment variable), {file: /absolute/path} (a file only its owner"
    " can read: chmod 600) or {credential: NAME} (systemd LoadCredential=NAME:/path)"
)

REQUIRED_HINTS: dict[str, str] = {
    "thumbprint": "pin the host's certificate (openssl s_client -connect HOST:443 </dev/null | openssl x509"
    " -noout -fingerprint -sha256), or set insecure_skip_tls_verify: true (lab only)",
    "host_key": "pin the host key (ssh-keyscan -p PORT HOST | ssh-keygen -lf -), set"
    " insecure_skip_host_key_check: true (lab only), or enabled: false for a licensed host driven through"
    " the API only",
    "key": "encryption is enabled, so the repository needs a key; " + REFERENCE_HOWTO,
    "window": "allowed: true needs a maintenance window (start, end, optional days)",
}

_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing (null)",
}


@functools.cache
def _validator(kind: str | None) -> Draft202012Validator:
    """Our own schemas are not checked against the meta-schema here (0.13 s of every command's start):
    they are generated, and ``tests/unit/test_config_example.py`` checks each one."""
    schema = schemas.kind_schema(kind) if kind else schemas.envelope_schema()
    return Draft202012Validator(schema)


def _resolve(schema: Schema, root: Schema) -> Schema:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        schema = root["$defs"][name]
    return schema


def _is_secret(schema: Schema, root: Schema) -> bool:
    return bool(schema.get("writeOnly") or _resolve(schema, root).get("writeOnly"))


def passes_secret(root: Schema, path: Sequence[PathElement]) -> bool:
    """Whether ``path`` leads to or into a ``writeOnly`` (secret) field of schema ``root``."""
    schema = root
    for element in path:
        if _is_secret(schema, root):
            return True
        resolved = _resolve(schema, root)
        following = (
            resolved.get("items") if isinstance(element, int) else resolved.get("properties", {}).get(element)
        )
        if not isinstance(following, dict):
            return False
        schema = following
    return _is_secret(schema, root)


def show(value: Any) -> str:
    """A value as it may appear in a message: scalars as written, containers never."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def suggest(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the candidate closest to ``word`` (ignoring case), or ``""``."""
    by_folded = {candidate.casefold(): candidate for candidate in candidates}
    folded = word.casefold()
    close = difflib.get_close_matches(folded, list(by_folded), n=1, cutoff=0.6)
    if not close and len(folded) >= 3:  # an abbreviation: "Repo" for "Repository"
        close = [c for c in by_folded if c.startswith(folded) or folded.startswith(c)][:1]
    return f"; did you mean {by_folded[close[0]]!r}?" if close else ""


def _choices(values: Sequence[Any]) -> str:
    return ", ".join(show(value) for value in values)


def _one_key_alternatives(branches: Sequence[Any]) -> list[str] | None:
    """For ``oneOf``/``anyOf`` of ``{"required": [key]}`` branches, the keys; else None."""
    keys: list[str] = []
    for branch in branches:
        if not (
            isinstance(branch, dict)
            and isinstance(branch.get("required"), list)
            and len(branch["required"]) == 1
        ):
            return None
        keys.append(branch["required"][0])
    return keys


def _yaml_text(document: Document, path: Sequence[PathElement]) -> str | None:
    _, node = document.find(path)
    if isinstance(node, ScalarNode) and node.style is None:
        return str(node.value)
    return None


def _type_message(error: ValidationError, document: Document, path: Sequence[PathElement]) -> str:
    value: Any = error.validator_value
    expected: list[str] = value if isinstance(value, list) else [value]
    words = " or ".join(_TYPE_WORDS.get(t, t) for t in expected)
    instance = error.instance
    message = f"expected {words}, got {show(instance)}"
    if isinstance(instance, str) and "boolean" in expected and instance.lower() in YAML11_TRUE | YAML11_FALSE:
        message += "; write true or false (yes/no/on/off are not booleans here)"
    elif (
        isinstance(instance, str)
        and {"integer", "number"} & set(expected)
        and re.fullmatch(r"0[0-9]+", instance)
    ):
        message += "; write the number without leading zeros"
    elif "string" in expected and not isinstance(instance, (dict, list)):
        text = _yaml_text(document, path)
        if text is not None:
            message += f'; quote it if a string was meant: "{text}"'
    return message


def _enum_message(instance: Any, options: Sequence[Any]) -> str:
    message = f"{show(instance)} is not one of {_choices(options)}"
    word = instance.lower() if isinstance(instance, str) else instance
    if "enabled" in options and (word in YAML11_TRUE or word is True):
        return message + "; did you mean 'enabled'?"
    if "disabled" in options and (word in YAML11_FALSE or word is False):
        return message + "; did you mean 'disabled'?"
    if isinstance(instance, str):
        return message + suggest(instance, [o for o in options if isinstance(o, str)])
    return message


def _secret_message(error: ValidationError) -> str:
    if error.validator == "type" and not isinstance(error.instance, dict):
        return "plaintext secrets are not allowed in the config; " + REFERENCE_HOWTO
    if error.validator in ("minProperties", "maxProperties", "type"):
        return "a secret reference has exactly one of env, file or credential; " + REFERENCE_HOWTO
    if error.validator == "pattern":
        return "is not " + schemas.PATTERN_HINTS.get(str(error.validator_value), "valid")
    return "is not a valid secret reference; " + REFERENCE_HOWTO


def _message(error: ValidationError, document: Document, path: list[PathElement]) -> str:
    keyword = error.validator
    value: Any = error.validator_value
    instance = error.instance
    if keyword == "type":
        return _type_message(error, document, path)
    if keyword == "required":
        missing = next(
            (name for name in value if isinstance(instance, dict) and name not in instance), value[0]
        )
        hint = REQUIRED_HINTS.get(missing)
        return f"missing required field {missing!r}" + (f": {hint}" if hint else "")
    if keyword == "enum":
        return _enum_message(instance, value)
    if keyword == "const":
        if path == ["apiVersion"]:
            return f"unsupported apiVersion {show(instance)}; expected {value!r}"
        if value is True and isinstance(instance, str) and instance.lower() in YAML11_TRUE:
            return f"expected true, got {show(instance)} (yes/on are not booleans here)"
        return f"expected {show(value)}, got {show(instance)}"
    if keyword == "pattern":
        hint = schemas.PATTERN_HINTS.get(str(value))
        return f"{show(instance)} is not {hint}" if hint else f"{show(instance)} does not match {value!r}"
    if keyword in ("oneOf", "anyOf"):
        keys = _one_key_alternatives(value)
        if keys is not None:
            present = [key for key in keys if isinstance(instance, dict) and key in instance]
            if keyword == "oneOf" and present:
                return f"takes exactly one of {', '.join(keys)}; found {' and '.join(present)}"
            return f"needs {'exactly' if keyword == 'oneOf' else 'at least'} one of {', '.join(keys)}"
        wanted = " or ".join(str(branch.get("description", "")).rstrip(".").lower() for branch in value)
        return f"{show(instance)} is not {wanted}"
    return _count_message(error) or f"{show(instance)} is invalid ({keyword})"


def _count_message(error: ValidationError) -> str | None:
    """The message of a keyword about counts, lengths and bounds, or fields that go together."""
    keyword = error.validator
    value: Any = error.validator_value
    instance = error.instance
    if keyword == "dependentRequired" and isinstance(instance, dict):
        for given, needed in value.items():
            missing = [name for name in needed if given in instance and name not in instance]
            if missing:
                return f"{given!r} needs {' and '.join(repr(name) for name in missing)} too"
    if keyword == "minItems":
        return f"needs at least {value} item{'s' if value != 1 else ''}"
    if keyword == "uniqueItems":
        return "contains the same item twice"
    if keyword == "minLength":
        return "must not be empty"
    if keyword in ("minimum", "maximum") and isinstance(instance, (int, float)):
        return error.message
    return None


def _issues_for(error: ValidationError, document: Document, root: Schema) -> Iterator[ConfigIssue]:
    path: list[PathElement] = list(error.absolute_path)
    schema: Any = error.schema
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(schema.get("properties", {}))
        for key in error.instance:
            if key not in known:
                yield document.issue([*path, key], f"unknown field {key!r}" + suggest(key, known))
        return
    if error.validator == "type" and isinstance(schema, dict) and ("enum" in schema or "const" in schema):
        return  # the enum or const error on the same value says it better
    secret = passes_secret(root, path)
    message = _secret_message(error) if secret else _message(error, document, path)
    yield document.issue(path, message)


SOURCE_IN_CONFIG = (
    "a GitSource belongs in the bootstrap file given to `esxi-reconciler run --source FILE`, not in the"
    " config it fetches (a commit must not be able to change where the config comes from or whose"
    " signatures are trusted); move this document there"
)


def validate_document(
    document: Document, kinds: Sequence[str] = schemas.KINDS
) -> tuple[str | None, list[ConfigIssue]]:
    """Check one document against its kind's schema; return its kind (None if not one of ``kinds``) and
    all issues. ``kinds``: those of a config directory, or ``(SOURCE_KIND,)`` for the bootstrap file."""
    data = document.data
    if not isinstance(data, dict):
        message = "a document must be a mapping with apiVersion, kind, metadata and spec"
        return None, [document.issue([], message)]
    kind = data.get("kind")
    known = kind if isinstance(kind, str) and kind in kinds else None
    if known is None and kind == schemas.SOURCE_KIND:
        return None, [document.issue(["kind"], SOURCE_IN_CONFIG)]
    validator = _validator(known)
    root: Schema = validator.schema  # type: ignore[assignment]
    issues = [issue for error in validator.iter_errors(data) for issue in _issues_for(error, document, root)]
    if known is None and isinstance(kind, str):
        # Replace jsonschema's enum message with one that suggests the closest kind.
        issues = [i for i in issues if i.path != "kind"]
        issues.append(
            document.issue(
                ["kind"],
                f"unknown kind {kind!r}; expected one of {', '.join(kinds)}" + suggest(kind, kinds),
            )
        )
    return known, issues


def apply_defaults(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a valid document with every schema ``default`` filled in where the field is absent."""
    root: Schema = _validator(kind).schema  # type: ignore[assignment]
    result = copy.deepcopy(data)
    _fill(root, result, root)
    return result


def _fill(schema: Schema, instance: Any, root: Schema) -> None:
    schema = _resolve(schema, root)
    if isinstance(instance, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                _fill(sub, instance[name], root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill(schema["items"], item, root)
