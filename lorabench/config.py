"""Typed, validated config dataclasses: every field has help text; bad input gets one clear error.

`option(default, help, ...)` declares a field; `from_dict(cls, data, where)` builds a config from
user data (a suite file, CLI overrides) strictly: unknown keys get a did-you-mean and the list of
valid keys, values are checked against the annotated type, choices and bounds, and
`__post_init__` of the dataclass may add cross-field checks (raise ValueError with a message).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from lorabench.errors import UserError


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices=None, low=None, high=None,
           default_factory: Any = dataclasses.MISSING):
    """A config field with help text and validation metadata (choices, inclusive bounds)."""
    if not help:
        raise ValueError("every config option needs help text")
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields_help(cls) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of every field, for docs and `list` output."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        out.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return out


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str) -> Any:
    """Check `value` against type `tp`; accept ints for floats and numeric strings from the CLI."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except UserError as e:
                errors.append(str(e))
        raise UserError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise UserError(f"{path}: expected one of {', '.join(map(repr, get_args(tp)))}, got {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str) and origin is list:
            value = [v.strip() for v in value.split(",") if v.strip()]  # CLI: a,b,c
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{path}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if isinstance(value, tp):
        return value
    raise UserError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def unknown_key_message(key: str, valid: list[str], where: str) -> str:
    msg = f"{where}: unknown key {key!r}."
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    return msg + f" Valid keys: {', '.join(valid)}."


def from_dict(cls, data: dict | None, where: str):
    """Build dataclass `cls` from `data`, strictly. `where` names the source for error messages."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of {cls.__name__} options, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(unknown_key_message(str(key), sorted(fields), where))
        f = fields[key]
        path = f"{where}.{key}"
        value = _coerce(value, hints[key], path)
        choices, low, high = f.metadata.get("choices"), f.metadata.get("low"), f.metadata.get("high")
        items = value if isinstance(value, list) else [value]
        for v in items:
            if v is None:
                continue
            if choices is not None and v not in choices:
                raise UserError(f"{path}: {v!r} is not valid; choose one of {', '.join(map(str, choices))}")
            if low is not None and isinstance(v, (int, float)) and v < low:
                raise UserError(f"{path}: {v!r} is below the minimum {low}")
            if high is not None and isinstance(v, (int, float)) and v > high:
                raise UserError(f"{path}: {v!r} is above the maximum {high}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{where}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge (override wins), used for suite defaults."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
