"""Dataclass configs: validated construction from user input, and stable hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from toylab.errors import ToylabError

C = TypeVar("C")
FLOAT32_MAX = 3.4028234663852886e38


def _is_table(annotation: Any) -> bool:
    """Whether a field takes a mapping: a nested dataclass config or a dict."""
    origin = typing.get_origin(annotation) or annotation
    return dataclasses.is_dataclass(annotation) or (isinstance(origin, type) and issubclass(origin, Mapping))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a user value (often a string from the command line) to a field's type."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if isinstance(value, Mapping) and not _is_table(annotation):
        raise ToylabError(f"'{key}' takes a single value, not a table")
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        if len(options) == 1:
            return _coerce(value, options[0], key)
        for option in options:  # the first type that takes the value, in the annotation's order
            try:
                return _coerce(value, option, key)
            except ToylabError:
                pass
        kinds = [", ".join(map(repr, typing.get_args(o))) if typing.get_origin(o) is typing.Literal else o.__name__ for o in options]
        raise ToylabError(f"invalid value {value!r} for '{key}'; expected {' or '.join(kinds)}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ToylabError(f"invalid value {value!r} for '{key}'; valid: {', '.join(map(str, allowed))}")
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
        inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
        return tuple(_coerce(v, inner, key) for v in items)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ToylabError(f"invalid value {value!r} for '{key}'; valid: true, false")
        if not isinstance(value, (bool, int)):
            raise ToylabError(f"invalid value {value!r} for '{key}'; valid: true, false")
        return bool(value)
    if annotation in (int, float):
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (isinstance(value, str) and not value.isascii()):
                raise ValueError  # int("٣") is 3: a number is written in ASCII digits, or it is not read as one
            converted = annotation(value)
        except (TypeError, ValueError, OverflowError):
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected {annotation.__name__}") from None
        if annotation is int and isinstance(value, float) and value != converted:
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected int")
        if annotation is int and not -(2**63) <= converted < 2**63:  # what torch, numpy and Lightning can hold
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected an int of at most 64 bits (|n| < 2^63)")
        if not math.isfinite(converted):
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected a finite number")
        if annotation is float and abs(converted) > FLOAT32_MAX:  # torch would overflow converting it to its float32
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected a number of magnitude at most {FLOAT32_MAX:.3g}")
        return converted
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ToylabError(f"invalid value {value!r} for '{key}'; expected a string")
        return str(value)
    if _is_table(annotation) and not isinstance(value, Mapping):
        fields = [f.name for f in dataclasses.fields(annotation)] if dataclasses.is_dataclass(annotation) else ["KEY"]
        raise ToylabError(f"'{key}' is a table, not a value (got {value!r}); set its keys, e.g. {key}.{fields[0]}=...")
    return value


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge nested config mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def default_table(field: dataclasses.Field) -> dict[str, Any]:
    """A table field's default as a table (a study's `TrainConfig(steps=1000)`, its `model` options), so keys set over
    it keep the rest of that default rather than the nested class's own defaults; empty when the field has none."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if dataclasses.is_dataclass(default):
        return to_dict(default)
    return dict(default) if isinstance(default, Mapping) else {}


def build(cls: type[C], options: Mapping[str, Any] | None = None, **overrides: Any) -> C:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and coercing types.

    Nested dataclass fields accept nested mappings.
    """
    if options is not None and not isinstance(options, Mapping):
        raise ToylabError(f"{cls.__name__} options must be a table of keys, not {options!r}")
    values = {**(options or {}), **overrides}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    hints = typing.get_type_hints(cls)
    if unknown:
        nested = [f"{name}.{unknown[0]}" for name in sorted(fields) if dataclasses.is_dataclass(hints[name])
                  and unknown[0] in {f.name for f in dataclasses.fields(hints[name])}]
        raise ToylabError(
            f"unknown {cls.__name__} key '{unknown[0]}'" + (f" (did you mean {' or '.join(repr(n) for n in nested)}?)" if nested else "")
            + f"; valid: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in values.items():
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):  # over the field's default, not the class's
            kwargs[key] = build(annotation, merge(default_table(fields[key]), value))
        elif isinstance(value, Mapping) and _is_table(annotation):
            kwargs[key] = merge(default_table(fields[key]), value)
        else:
            kwargs[key] = _coerce(value, annotation, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as error:
        raise ToylabError(f"invalid {cls.__name__}: {error}") from None


def check_memory(nbytes: float, what: str, fix: str) -> None:
    """Refuse (one-line ToylabError) work whose estimated memory exceeds this machine's physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): cannot tell
        return
    if nbytes > total:
        raise ToylabError(f"{what} needs about {nbytes / 2**30:,.0f} GiB of memory, more than this machine's "
                          f"{total / 2**30:,.0f} GiB; {fix}")


MAX_HOURS = 12
"""Work estimated to take longer than this is refused unless forced (`--force`)."""


def check_time(seconds: float, what: str, fix: str) -> None:
    """Refuse (one-line ToylabError) work whose estimated time exceeds `MAX_HOURS`, saying how to force it."""
    if seconds > MAX_HOURS * 3600:
        hours = seconds / 3600
        estimate = f"{hours:,.0f} hours" if hours < 1e6 else f"{hours:.1e} hours"
        raise ToylabError(f"{what} would take about {estimate} (more than {MAX_HOURS}); {fix}, or pass --force to run it anyway")


OMIT_AT_DEFAULT = {"omit_at_default": True}
"""Field metadata of an option added after runs were saved: `to_dict` leaves it out while it has its default, so the
configs (and hashes) of runs saved before it existed stay what they were, and those runs are reused."""


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config, without fields at their default that say `OMIT_AT_DEFAULT`."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                    if not (f.metadata.get("omit_at_default") and getattr(value, f.name) == f.default)}
        if isinstance(value, Mapping):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return json.loads(json.dumps(plain(config), default=list))


def config_hash(config: Any, length: int = 10) -> str:
    """A stable short hash of a config (a dataclass or a JSON-ready mapping)."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """Parse command-line `KEY=VALUE` strings into a dict."""
    options: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ToylabError(f"invalid option {item!r}; expected KEY=VALUE")
        if key.strip() in options:
            raise ToylabError(f"option '{key.strip()}' given twice ({key.strip()}={options[key.strip()]}, {item.strip()}); give it once")
        options[key.strip()] = value.strip()
    return options


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16
"""Tables nested deeper than this in a config file are refused (a config's tables nest two or three deep)."""


def depth(value: Any) -> int:
    """How deeply tables and lists nest in `value` (0 for a plain value), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level + 1)
            stack += [(child, level + 1) for child in children]
    return deepest


def load_file(path: Path) -> dict[str, Any]:
    """Read a JSON or TOML config file holding a table of keys into a dict."""
    import tomllib

    path = Path(path)
    if path.suffix not in (".json", ".toml"):
        raise ToylabError(f"unsupported config file {path}; valid: .json, .toml")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO or a device could block or never end
            raise ToylabError(f"config file {path} is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ToylabError(f"config file {path} is {info.st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
        text = path.read_bytes().decode()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise ToylabError(f"config file not found: {path}") from None
    except OSError as error:
        raise ToylabError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ToylabError(f"cannot parse config file {path}: it is not UTF-8 text") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ToylabError(f"cannot parse config file {path}: {error}") from None
    except RecursionError:
        raise ToylabError(f"cannot parse config file {path}: it nests deeper than {MAX_CONFIG_DEPTH} tables or lists") from None
    except ValueError as error:  # an integer beyond Python's 4300 digits
        raise ToylabError(f"cannot parse config file {path}: {str(error).split(';')[0]}") from None
    if depth(data) > MAX_CONFIG_DEPTH:
        raise ToylabError(f"config file {path} nests deeper than {MAX_CONFIG_DEPTH} tables or lists")
    if not isinstance(data, dict):
        raise ToylabError(f"config file {path} must hold a table of keys, not {type(data).__name__} {json.dumps(data)[:40]}")
    return data
