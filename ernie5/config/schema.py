"""Typed config building: plain YAML dicts -> nested dataclasses, with errors that name the dotted key path.

A component declares `@dataclass class Config` with typed fields and, optionally, `validate(self, path)` for
cross-field rules (it raises ConfigError naming `path.key`). `build(cls, raw, path)` checks unknown keys (with a
close-match hint), types, and runs `validate` bottom-up.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from ernie5.errors import ConfigError


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp`, converting only where YAML is ambiguous (1e-4 read as a string)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], path)
        raise ConfigError(path, f"unsupported annotation {tp}")  # a bug in a Config, not user input
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(path, f"{value!r} is not one of {choices}{more}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(path, f"unsupported annotation {_type_name(tp)}")


def build(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass `cls` from mapping `raw`; every problem raises ConfigError naming the dotted path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path or "<root>", f"expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            more = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(fields)})"
            raise ConfigError(join(path, str(key)), f"unknown key{more}")
    kwargs = {name: _coerce(raw[name], hints[name], join(path, name)) for name in fields if name in raw}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def to_dict(obj: Any) -> dict:
    """Plain-dict view of a config (for YAML dumps)."""
    return dataclasses.asdict(obj)


def require(ok: bool, path: str, reason: str) -> None:
    """Raise ConfigError(path, reason) unless `ok` (used by Config.validate methods)."""
    if not ok:
        raise ConfigError(path, reason)
