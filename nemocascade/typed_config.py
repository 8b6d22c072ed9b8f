"""Typed config sections: one `from_mapping` that builds a frozen dataclass from a config mapping.

Every section of a config that code reads (`optim`, `train`, a stage of the cascade, its `loss`,
`eval`, `model`) is a frozen dataclass whose fields and defaults are the one place the keys are
declared. `from_mapping(cls, mapping, section)` builds it from a `dict` or `ConfigDict`:

  * an unknown key is an error naming `section.key` and the valid keys (a near match is
    suggested);
  * a value of the wrong type is an error naming `section.key`, the declared type and the value;
    ints are accepted for floats, a list for a tuple, a comma-separated string for a tuple of
    strings; nothing else is converted (no `int("3")`, no bool from 0/1);
  * a nested dataclass field is built from its own mapping (its section is `section.field`);
  * a field without a default must be given.

Errors are `ConfigError`, both a `KeyError` and a `ValueError` (callers catching either keep
working), whose message is printed as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(KeyError, ValueError):
    """A config section has an unknown, missing or mistyped key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def from_mapping(cls: type[T], mapping: Mapping[str, Any], section: str) -> T:
    """`cls(**mapping)` with every key and value checked against `cls`'s declared fields."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_mapping: {cls!r} is not a dataclass")
    if isinstance(mapping, cls):
        return mapping
    if not isinstance(mapping, Mapping) and not hasattr(mapping, "items"):
        raise ConfigError(
            f"{section}: expected a mapping of keys for {cls.__name__}, got {mapping!r}"
        )
    values = dict(mapping.items())
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key, list(fields), n=1)
            if near:
                hints.append(f"{key!r} -> did you mean {near[0]!r}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ConfigError(
            f"{section}: unknown keys {unknown}{hint}; valid keys are {sorted(fields)}"
        )
    hints_of = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{section}.{name}: required key is missing")
            continue
        kwargs[name] = convert(values[name], hints_of[name], f"{section}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ checks: name the section
        msg = str(e)
        raise type(e)(msg if msg.startswith(section) else f"{section}: {msg}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, where: str) -> Any:
    """`value` checked (and minimally converted) to the annotation `tp`; `where` names the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: None is not allowed (expected {_type_name(tp)})")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and args and args[-1] is Ellipsis and args[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(
            convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (dict, Mapping) or tp is dict:
        if not hasattr(value, "items"):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(tp) or (Any, Any)
        return {
            convert(k, args[0], where): convert(v, args[1], f"{where}.{k}")
            for k, v in value.items()
        }
    raise TypeError(f"{where}: unsupported annotation {tp!r} in a config dataclass")
