"""The documented schemas of the files in a run directory (JSON Schema 2020-12, `toylab/schemas/NAME.schema.json`), and
the one check every reader of such a file goes through (`read_checked`): a file that does not fit is a one-line
ToylabError naming it and the offending key, before anything is written.

`results` is the envelope every study writes to `results.json` and, under `$defs` by study name, the keys each built-in
study always writes with their types; `study-config`, `timing`, `summary` and `expert-map` are a study run's other files;
`train-config` and `final` those of one trained model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from toylab import io
from toylab.errors import ToylabError

SCHEMAS = Path(__file__).parent / "schemas"
JSON_TYPES = {"object": "an object", "array": "an array", "string": "a string", "boolean": "a boolean", "integer": "an integer",
              "number": "a number", "null": "null"}
"""JSON Schema's type names in words."""
PYTHON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
"""The JSON type of a parsed value."""


@functools.lru_cache(maxsize=None)
def schema(name: str) -> dict[str, Any]:
    """The schema `name` (`toylab/schemas/NAME.schema.json`), parsed."""
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))


def results_schema() -> dict[str, Any]:
    """The results schema, parsed."""
    return schema("results")


def validate(data: Any, name: str, definition: str | None = None) -> None:
    """Check `data` against schema `name` and, where that schema defines it under `$defs`, `definition` too (a study's
    own keys of `results`); a one-line ToylabError naming the offending key path (`specialization.0.depth.routing_nmi`)
    if it does not fit."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    rules = schema(name)
    if definition is not None and definition in rules.get("$defs", {}):
        rules = {**rules, "allOf": [{"$ref": f"#/$defs/{definition}"}]}
    error = best_match(Draft202012Validator(rules).iter_errors(data))
    if error is None:
        return
    path = [str(key) for key in error.absolute_path]
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        raise ToylabError(f"key '{'.'.join([*path, missing])}' is missing")
    where = f"key '{'.'.join(path)}'" if path else "the top level"
    if error.validator == "type":
        raise ToylabError(f"{where} must be {expected(error.schema)}, not {JSON_TYPES[PYTHON_TYPES[type(error.instance)]]}")
    if error.validator in ("anyOf", "oneOf", "enum", "const"):
        alternatives = error.validator_value if error.validator in ("anyOf", "oneOf") else [error.schema]
        raise ToylabError(f"{where} must be {' or '.join(expected(rule) for rule in alternatives)}, not {json.dumps(error.instance)[:40]}")
    raise ToylabError(f"{where}: {' '.join(error.message.split())[:160]}")


def expected(rule: dict[str, Any]) -> str:
    """What a schema's `rule` accepts, in words: "an integer", "a string or null", '"auto"'."""
    if "const" in rule:
        return json.dumps(rule["const"])
    if "enum" in rule:
        return " or ".join(json.dumps(value) for value in rule["enum"])
    kinds = rule.get("type", [])
    return " or ".join(JSON_TYPES[kind] for kind in (kinds if isinstance(kinds, list) else [kinds])) or "something else"


def validate_results(data: Any, study: str | None = None) -> None:
    """Check `data` against the results envelope and, for a built-in `study`, the keys it always writes."""
    validate(data, "results", study)


def read_checked(path: Path, name: str, definition: str | None = None) -> Any:
    """The JSON file `path` (a regular file: never a FIFO or a device), checked against schema `name` (`validate`); a
    one-line ToylabError starting with the path if it cannot be read or does not fit."""
    data = io.read_json(path)
    try:
        validate(data, name, definition)
    except ToylabError as error:
        raise ToylabError(f"{path}: {error}") from None
    return data
