"""The documented schema of `results.json` (`toylab/schemas/results.schema.json`, JSON Schema 2020-12): the envelope
every study writes and, under `$defs` by study name, the keys each built-in study always writes with their types."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from toylab.errors import ToylabError

SCHEMA = Path(__file__).parent / "schemas" / "results.schema.json"
JSON_TYPES = {"object": "an object", "array": "an array", "string": "a string", "boolean": "a boolean", "integer": "an integer",
              "number": "a number", "null": "null"}
"""JSON Schema's type names in words."""
PYTHON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
"""The JSON type of a parsed value."""


@functools.lru_cache(maxsize=1)
def results_schema() -> dict[str, Any]:
    """The results schema, parsed."""
    return json.loads(SCHEMA.read_text(encoding="utf-8"))


def validate_results(data: Any, study: str | None = None) -> None:
    """Check `data` against the results envelope and, for a built-in `study`, the keys it always writes; a one-line
    ToylabError naming the offending key path (`specialization.0.depth.routing_nmi`) if they do not fit."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    schema = results_schema()
    if study is not None and study in schema["$defs"]:
        schema = {**schema, "allOf": [{"$ref": f"#/$defs/{study}"}]}
    error = best_match(Draft202012Validator(schema).iter_errors(data))
    if error is None:
        return
    path = [str(key) for key in error.absolute_path]
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        raise ToylabError(f"key '{'.'.join([*path, missing])}' is missing")
    where = f"key '{'.'.join(path)}'" if path else "the top level"
    if error.validator == "type":
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        found = JSON_TYPES[PYTHON_TYPES[type(error.instance)]]
        raise ToylabError(f"{where} must be {' or '.join(JSON_TYPES[kind] for kind in expected)}, not {found}")
    raise ToylabError(f"{where}: {' '.join(error.message.split())[:160]}")
