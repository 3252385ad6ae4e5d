"""Sweep knobs: `$list` (a set of values) and `$range` (an interval) anywhere in a config tree.

In YAML they are written `!list [8, 16]` and `!range {start: 1e-5, end: 1e-3, log: true}`;
the loader turns both into the plain forms `{"$list": [...]}` and `{"$range": {...}}`,
which is also how JSON and Helm values write them. The tree keeps the plain forms.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LIST_KEY = "$list"
RANGE_KEY = "$range"
KNOB_KEYS = (LIST_KEY, RANGE_KEY)

PathPart = Union[str, int]
Path = tuple[PathPart, ...]


class ListKnob(BaseModel):
    """A discrete set of candidate values; each one is validated against the field it stands in."""

    model_config = ConfigDict(extra="forbid")
    values: list[Any] = Field(min_length=1)

    def candidates(self) -> list[Any]:
        return list(self.values)


class RangeKnob(BaseModel):
    """A numeric interval [start, end] sampled uniformly (or log-uniformly) by random search."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    start: Union[int, float]
    end: Union[int, float]
    dtype: Literal["int", "float"] | None = Field(
        default=None, description="int rounds samples; default: int when both bounds are integers"
    )
    log: bool = Field(default=False, description="sample log-uniformly (needs start > 0)")

    @model_validator(mode="after")
    def _check_bounds(self) -> RangeKnob:
        if isinstance(self.start, bool) or isinstance(self.end, bool):
            raise ValueError("range bounds must be numbers, not booleans")
        if not all(abs(bound) <= sys.float_info.max for bound in (self.start, self.end)):
            raise ValueError(f"range bounds must be finite numbers within ±{sys.float_info.max:.3g}")
        if not math.isfinite(float(self.end) - float(self.start)):
            raise ValueError("the range is wider than a float can hold; narrow it")
        if not self.start < self.end:
            raise ValueError(f"range start ({self.start}) must be smaller than end ({self.end})")
        if self.log and self.start <= 0:
            raise ValueError(f"a log range needs a positive start, got {self.start}")
        return self

    @property
    def is_int(self) -> bool:
        if self.dtype is not None:
            return self.dtype == "int"
        return isinstance(self.start, int) and isinstance(self.end, int)

    def candidates(self) -> list[Any]:
        """The bounds: what validation checks the field against."""
        return [self.cast(self.start), self.cast(self.end)]

    def cast(self, value: float) -> int | float:
        return int(round(value)) if self.is_int else float(value)

    def sample(self, unit: float) -> int | float:
        """Map a uniform draw in [0, 1) onto the range."""
        if self.log:
            low, high = math.log(self.start), math.log(self.end)
            return self.cast(math.exp(low + unit * (high - low)))
        return self.cast(self.start + unit * (self.end - self.start))

    def contains(self, value: float) -> bool:
        return self.cast(self.start) <= value <= self.cast(self.end)


Knob = Union[ListKnob, RangeKnob]


class KnobSyntaxError(ValueError):
    def __init__(self, message: str, sub_path: Path = ()) -> None:
        super().__init__(message)
        self.sub_path = sub_path


def knob_kind(value: Any) -> str | None:
    """`$list`/`$range` when `value` is written as a knob, else None."""
    if isinstance(value, dict) and len(value) == 1:
        (key,) = value.keys()
        if key in KNOB_KEYS:
            return key
    return None


def parse_knob(value: dict[str, Any]) -> Knob:
    """Parse a plain-form knob; raises KnobSyntaxError naming what is wrong."""
    kind = knob_kind(value)
    body = value[kind]
    if kind == LIST_KEY:
        if not isinstance(body, list) or not body:
            raise KnobSyntaxError("a $list needs a non-empty list of candidate values", (LIST_KEY,))
        return ListKnob(values=body)
    if not isinstance(body, dict):
        raise KnobSyntaxError("a $range needs a mapping {start, end, dtype?, log?}", (RANGE_KEY,))
    try:
        return RangeKnob.model_validate(body)
    except ValidationError as error:
        errors = error.errors()
        # Of a union's errors at the first failing key (int, then float), the last says most: "a finite number".
        chosen = [item for item in errors if item["loc"][:1] == errors[0]["loc"][:1]][-1]
        loc = tuple(part for part in chosen["loc"] if isinstance(part, (str, int)))
        message = chosen["msg"].removeprefix("Value error, ")
        raise KnobSyntaxError(f"bad $range: {message}", (RANGE_KEY, *loc[:1])) from None


def iter_knobs(tree: Any, path: Path = ()) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (path, plain knob) for every outermost knob in the tree, in sorted path order."""
    if knob_kind(tree):
        yield path, tree
        return
    if isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from iter_knobs(tree[key], (*path, key))
    elif isinstance(tree, list):
        for index, item in enumerate(tree):
            yield from iter_knobs(item, (*path, index))


def combinations(tree: Any) -> int | None:
    """How many configs the `$list` knobs of `tree` make at most (nested knobs included), counted without
    expanding anything: a product over the outermost knobs, each the sum over its candidates. None when a
    `$range` makes the number unbounded (or a knob is malformed: validation says so)."""
    total = 1
    for _, plain in iter_knobs(tree):
        body = plain[knob_kind(plain)]
        if knob_kind(plain) != LIST_KEY or not isinstance(body, list):
            return None
        count = 0
        for candidate in body:
            inner = combinations(candidate)
            if inner is None:
                return None
            count += inner
        total *= count
    return total


def set_at(tree: Any, path: Path, value: Any) -> Any:
    """A copy of `tree` with `value` at `path` (only the spine is copied)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        copy = dict(tree)
        copy[head] = set_at(tree[head], rest, value) if rest else value  # a new key may be added
        return copy
    copy_list = list(tree)
    copy_list[head] = set_at(tree[head], rest, value)
    return copy_list


def first_candidates(tree: Any) -> Any:
    """Replace every knob (nested ones too) by its first candidate: the representative config."""
    if knob_kind(tree):
        return first_candidates(parse_knob(tree).candidates()[0])
    if isinstance(tree, dict):
        return {key: first_candidates(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [first_candidates(item) for item in tree]
    return tree


def dotted(path: Path) -> str:
    """`('peft_conf', 'peft_kwargs', 'r', '$list', 1)` -> `peft_conf.peft_kwargs.r[1]`."""
    text = ""
    for part in path:
        if part in KNOB_KEYS:
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "<root>"
