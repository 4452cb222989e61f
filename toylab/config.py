"""Dataclass configs: validated construction from user input, and stable hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from toylab.errors import ToylabError

C = TypeVar("C")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a user value (often a string from the command line) to a field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(value, options[0], key)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ToylabError(f"invalid value {value!r} for '{key}'; valid: {', '.join(map(str, allowed))}")
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
        return tuple(_coerce(v, inner, key) for v in items)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ToylabError(f"invalid value {value!r} for '{key}'; valid: true, false")
        return bool(value)
    if annotation in (int, float, str):
        try:
            converted = annotation(value)
        except (TypeError, ValueError):
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected {annotation.__name__}") from None
        if annotation is int and isinstance(value, float) and value != converted:
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected int")
        return converted
    return value


def build(cls: type[C], options: Mapping[str, Any] | None = None, **overrides: Any) -> C:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and coercing types.

    Nested dataclass fields accept nested mappings.
    """
    values = {**(options or {}), **overrides}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ToylabError(
            f"unknown {cls.__name__} key '{unknown[0]}'; valid: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
            kwargs[key] = build(annotation, value)
        elif isinstance(value, Mapping):
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _coerce(value, annotation, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ToylabError(f"invalid {cls.__name__}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def config_hash(config: Any, length: int = 10) -> str:
    """A stable short hash of a config (a dataclass or a JSON-ready mapping)."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """Parse command-line `KEY=VALUE` strings into a dict."""
    options = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ToylabError(f"invalid option {item!r}; expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def load_file(path: Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict."""
    import tomllib

    if not path.is_file():
        raise ToylabError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            return json.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ToylabError(f"cannot parse config file {path}: {error}") from None
    raise ToylabError(f"unsupported config file {path}; valid: .json, .toml")
