"""Check a composed config against its dataclass schema and report every problem at once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Annotated, Any, Optional, Union, get_args, get_origin


# Returned for a wrongly typed value: the field keeps its default so the value checks of
# every other field can still run and be reported in the same error.
_BAD = object()


class ConfigError(ValueError):
    """A config that cannot run; the message lists each problem and how to fix it."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the {source}:\n{lines}")


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: a finite number within these bounds.

    Every int and float field of a schema is declared `Annotated[<type>, Range(...)]`, so the
    validator checks each one the same way and a test can prove that none was forgotten. Plain
    comparisons in `problems()` are how NaN used to slip through: `nan <= 0` is False.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    note: str = ""  # why, or what an edge value means, e.g. "0 = greedy"

    def contains(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self, nullable: bool = False) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        elif high:
            text = f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        else:
            text = "a finite number"
        text += " or null" if nullable else ""
        return f"{text} ({self.note})" if self.note else text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _range_of(tp: Any) -> Optional[Range]:
    return next((m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Range)), None)


def _nullable(tp: Any) -> bool:
    return get_origin(tp) is Union and type(None) in get_args(tp)


def _is_nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _takes_numbers(tp: Any) -> bool:
    if get_origin(tp) in (Annotated, Union):
        return any(_takes_numbers(a) for a in get_args(tp) if not isinstance(a, Range))
    return tp in (int, float, Any)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if _nullable(tp) else "")
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
    if origin is Annotated:
        inner, rng = get_args(tp)[0], _range_of(tp)
        allowed = "" if rng is None else f"; it must be {rng.describe(_nullable(inner))}"
        if _is_nonfinite(value):
            problems.append(f"{key}={value} is not a finite number{allowed}")
            return _BAD
        coerced = _coerce(value, inner, key, problems)
        if rng is not None and isinstance(coerced, (int, float)) and not isinstance(coerced, bool) and not rng.contains(coerced):
            problems.append(f"{key}={coerced} must be {rng.describe(_nullable(inner))}")
            return _BAD
        return coerced
    # NaN and infinity pass every `x < bound` check unnoticed, so no numeric field may hold them,
    # declared range or not (a float arm of a Union, a mapping of floats, an Any).
    if _is_nonfinite(value) and _takes_numbers(tp):
        problems.append(f"{key}={value} is not a finite number")
        return _BAD
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
    hints = typing.get_type_hints(cls, include_extras=True)
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


def numeric_fields(schema: type, prefix: str = "") -> list[tuple[str, Any, Optional[Range]]]:
    """(dotted key, type, Range or None) of every int/float leaf of `schema`, nested groups included.

    A list of numbers is one entry, its key ending in `[]`; a leaf reached through no Range
    shows None, which the test of the schemas refuses.
    """
    out: list[tuple[str, Any, Optional[Range]]] = []
    hints = typing.get_type_hints(schema, include_extras=True)
    for f in dataclasses.fields(schema):
        out += _numeric_leaves(hints[f.name], f"{prefix}{f.name}", None)
    return out


def _numeric_leaves(tp: Any, key: str, rng: Optional[Range]) -> list[tuple[str, Any, Optional[Range]]]:
    origin = get_origin(tp)
    if origin is Annotated:
        return _numeric_leaves(get_args(tp)[0], key, _range_of(tp) or rng)
    if dataclasses.is_dataclass(tp):
        return numeric_fields(tp, f"{key}.")
    if origin is Union:
        leaves = [leaf for arm in get_args(tp) for leaf in _numeric_leaves(arm, key, rng)]
        if len(leaves) > 1 and all(leaf[0] == key for leaf in leaves):  # int | float: one field that takes floats
            return [(key, float, rng)]
        return leaves
    if origin is list:
        return _numeric_leaves(get_args(tp)[0], f"{key}[]", rng)
    if origin is dict:
        return _numeric_leaves(get_args(tp)[1], f"{key}.<name>", rng)
    if tp in (int, float):
        return [(key, tp, rng)]
    return []


def validate(values: dict, schema: type, source: str = "config") -> Any:
    """Build `schema` from a plain dict; raise ConfigError listing every type and value problem."""
    problems: list[str] = []
    obj = _build(schema, values, "", problems)
    if obj is not None:
        problems += obj.problems()
    if problems:
        raise ConfigError(problems, source)
    return obj
