"""Typed records checked by the rules declared on their fields: the one validation mechanism of the
manifest, the protocol messages and the trainer's configuration.

A field states its type in its annotation and its rules in `rule(...)` (or `options.option(...)`,
which is `rule` plus a command-line flag):

    @dataclass(frozen=True)
    class TapSpec:
        layer: int = rule(min=0)
        hidden: int = rule(min=1, max=65536)
        fmt: str = rule(choices=codec.FORMATS)

    tap = load(TapSpec, {"layer": 2, "hidden": 64, "fmt": "nf4"}, "taps[0]")  # SchemaError naming the field
    dump(tap)                                                                  # the dict again, in field order

`check(obj)` checks an instance: every field's type, then its rules, then nested records, then the
class's `cross_check()` (rules across fields) when it has one. `load` builds a record from JSON: a
field's key is its name unless `rule(key=...)` keeps an older on-disk name, unknown keys are ignored
(forward compatibility), nested records load recursively. `migrate` upgrades an older document one
version at a time before it is loaded. The edges turn `SchemaError` into their own error class
(ManifestError, ProtocolError with a code, ConfigError).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any, Callable, Mapping

from mobillm.common.errors import BadInput

RULES = "mobillm.rules"


class SchemaError(BadInput, ValueError):
    """A record field of the wrong type or out of its declared range; the message names the field."""


def rule(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
         choices: typing.Iterable | None = None, check: Callable[[Any], str | None] | None = None,
         key: str | None = None, omit_none: bool = False, default_factory: Any = dataclasses.MISSING,
         metadata: dict | None = None) -> Any:
    """A dataclass field with validation rules: `min`/`max` bound a number (each item of a list),
    `choices` lists the allowed values, `check(value)` returns what is wrong or None; `key` is the
    JSON key when it differs from the field name; `omit_none`: `dump` leaves the key out when None."""
    rules = {"min": min, "max": max, "choices": tuple(choices) if choices is not None else None, "check": check,
             "key": key, "omit_none": omit_none}
    meta = {**(metadata or {}), RULES: rules}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def rules_of(f: dataclasses.Field) -> dict:
    return f.metadata.get(RULES, {})


def key_of(f: dataclasses.Field) -> str:
    return rules_of(f).get("key") or f.name


def has_type(value, tp) -> bool:
    """isinstance for field annotations: int, str, bool, float, dict, None, records, unions,
    list[X], tuple[X, ...] (bool is never an int, an int is a float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, arg) for arg in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, origin):
            return False
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):  # tuple[float, float]
            return len(value) == len(args) and all(has_type(v, a) for v, a in zip(value, args))
        return all(has_type(v, args[0]) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def type_name(tp) -> str:
    """An annotation as written: int, list[int], tuple[TapSpec, ...], str | None."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return re.sub(r"\b(?:\w+\.)+(?=\w)", "", str(tp)).replace("NoneType", "None")


def _path(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _rule_error(rules: dict, value) -> str | None:
    """What `value` breaks of `rules`, or None: `check` sees the whole value, the other rules each
    item of a list or tuple."""
    if value is not None and rules.get("check"):
        problem = rules["check"](value)
        if problem:
            return problem
    return _item_error(rules, value)


def _item_error(rules: dict, value) -> str | None:
    if isinstance(value, (list, tuple)):
        return next((e for e in (_item_error(rules, v) for v in value) if e), None)
    if value is None or dataclasses.is_dataclass(value):
        return None
    lo, hi, choices = rules.get("min"), rules.get("max"), rules.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {list(choices)}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and hi is not None and not lo <= value <= hi:
            return f"must be in {lo}..{hi}, got {value!r}"
        if lo is not None and value < lo:
            return f"must be >= {lo}, got {value!r}"
        if hi is not None and value > hi:
            return f"must be <= {hi}, got {value!r}"
    return None


def check(obj, where: str = "") -> None:
    """SchemaError naming the first field of record `obj` (and of the records it holds) whose value
    is not of its declared type or breaks its rules; then `obj.cross_check()`, when it has one."""
    hints = _hints(obj.__class__)
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), _path(where, key_of(f))
        if not has_type(value, hints[f.name]):
            raise SchemaError(f"{name} must be {type_name(hints[f.name])}, got {value!r:.60}")
        problem = _rule_error(rules_of(f), value)
        if problem:
            raise SchemaError(f"{name} {problem}")
        if dataclasses.is_dataclass(value):
            check(value, name)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check(item, f"{name}[{i}]")
    if hasattr(obj, "cross_check"):
        obj.cross_check()


@functools.cache
def _hints(cls: type) -> dict:
    """The resolved annotations of record class `cls` (once per class: messages are read per frame)."""
    return typing.get_type_hints(cls)


def _record_type(tp) -> type | None:
    """The record class a field of annotation `tp` holds directly (X or X | None), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _from_json(value, tp, where: str):
    """A JSON value as annotation `tp` holds it: objects of records loaded, arrays of tuples as tuples."""
    record = _record_type(tp)
    if record is not None and isinstance(value, dict):
        return load(record, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple) and isinstance(value, list):
        args = typing.get_args(tp)
        if origin is list or args[1:] == (Ellipsis,):
            return origin(_from_json(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return origin(value)  # a fixed-length tuple, e.g. tuple[float, float]
    return value


def load(cls, data, where: str = ""):
    """A checked `cls` record from a JSON object (see the module docstring); SchemaError otherwise."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where or cls.__name__} must be an object, got {data!r:.60}")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = key_of(f)
        found, value = _lookup(data, key)
        if found:
            values[f.name] = _from_json(value, hints[f.name], _path(where, key))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{_path(where, key)} is missing")
    obj = cls(**values)
    check(obj, where)
    return obj


def _lookup(data: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of `key` in `data`; "a.b" is data["a"]["b"] (a field kept in a nested object)."""
    head, dot, rest = key.partition(".")
    if head not in data:
        return False, None
    if not dot:
        return True, data[head]
    if not isinstance(data[head], dict):
        raise SchemaError(f"{head} must be an object, got {data[head]!r:.60}")
    return _lookup(data[head], rest)


def dump(obj) -> dict:
    """A record as JSON data by key, in field order (records nested inside dumped too)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and rules_of(f).get("omit_none"):
            continue
        out[key_of(f)] = _to_json(value)
    return out


def _to_json(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump(value)
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def migrate(data: dict, what: str, version_key: str, readers: Mapping[int, Callable[[dict], dict]]) -> dict:
    """`data` brought to the shape this code loads: `readers[v]` turns a document of format version
    v into it (older versions chain through newer ones: `readers[1] = lambda d: readers[2](v1_to_v2(d))`).
    SchemaError naming the versions this mobillm reads when `data`'s is not one of them."""
    version = data.get(version_key)
    if not isinstance(version, int) or isinstance(version, bool) or version not in readers:
        known = ", ".join(str(v) for v in sorted(readers))
        raise SchemaError(f"{what} format version {version!r} is not supported (this mobillm reads {known})")
    return readers[version](dict(data))
