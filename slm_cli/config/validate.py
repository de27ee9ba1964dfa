"""Check a composed config against its dataclass schema and report every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Union, get_args, get_origin


# Returned for a wrongly typed value: the field keeps its default so the value checks of
# every other field can still run and be reported in the same error.
_BAD = object()


class ConfigError(ValueError):
    """A config that cannot run; the message lists each problem and how to fix it."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the {source}:\n{lines}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is dict:
        _, inner = get_args(tp) or (str, Any)
        return f"mapping of {_type_name(inner)}"
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return `value` as type `tp`, or record a problem and return it unchanged."""
    if value == "???":  # OmegaConf's mark for a value the user must supply
        problems.append(f"{key} is required: add {key}=<value> to the command line")
        return None
    origin = get_origin(tp)
    if origin is Union:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:  # the first arm the value fits
            trial: list[str] = []
            coerced = _coerce(value, arm, key, trial)
            if not trial:
                return coerced
        if len(arms) == 1:
            return _coerce(value, arms[0], key, problems)
        problems.append(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
        return _BAD
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key} must be a group of settings, got {value!r}")
            return _BAD
        return _build(tp, value, key, problems)
    if origin is dict:
        _, inner = get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            problems.append(f"{key}={value!r} must be a mapping, e.g. {key}={{name: value}}")
            return _BAD
        items = {k: _coerce(v, inner, f"{key}.{k}", problems) for k, v in value.items()}
        return _BAD if any(v is _BAD for v in items.values()) else items
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}={value!r} must be a list, e.g. {key}=[0,1]")
            return _BAD
        items = [_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if any(i is _BAD for i in items) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    problems.append(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
    return _BAD


def _build(cls: type, values: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            problems.append(f"unknown key {full!r}{hint} (valid keys here: {', '.join(fields)})")
            continue
        coerced = _coerce(value, hints[key], full, problems)
        if coerced is not _BAD:
            kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong-typed value made the dataclass itself fail
        problems.append(f"{prefix or 'config'}: {exc}")
        return None


def validate(values: dict, schema: type, source: str = "config") -> Any:
    """Build `schema` from a plain dict; raise ConfigError listing every type and value problem."""
    problems: list[str] = []
    obj = _build(schema, values, "", problems)
    if obj is not None:
        problems += obj.problems()
    if problems:
        raise ConfigError(problems, source)
    return obj
