"""Expansion of a knob tree into concrete configs: grid and random (successive halving samples randomly).

Knobs are taken in sorted path order, so the same file with its keys in another order
gives the same runs for the same seed. A knob's candidate may itself hold knobs (a
`$list` of whole sub-configs); they are expanded after it is chosen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from finetune.config.knobs import Knob, ListKnob, combinations, dotted, iter_knobs, parse_knob, set_at

MAX_DRAWS_PER_RUN = 200
# Random search counts the distinct combinations exactly (by expanding them) only when there are at most
# this many times num_runs; beyond that the draws find enough, and MAX_DRAWS_PER_RUN ends a search
# among mostly duplicate candidates with an error.
EXACT_COUNT_FACTOR = 4


class ExpansionError(ValueError):
    pass


@dataclass(frozen=True)
class Expansion:
    """One concrete config and the knob choices that made it."""

    config: dict[str, Any]
    knobs: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def key(self) -> str:
        return canonical_json(self.config)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        text = canonical_json(value)
        return text if len(text) <= 24 else text[:21] + "..."
    return str(value)


def _choose(expansion: Expansion, path: tuple, value: Any, label: str) -> Expansion:
    name = dotted(path)
    return Expansion(
        config=set_at(expansion.config, path, value),
        knobs={**expansion.knobs, name: value},
        labels={**expansion.labels, name: label},
    )


def _list_label(knob: ListKnob, index: int) -> str:
    value = knob.values[index]
    return f"#{index}" if isinstance(value, (dict, list)) else format_value(value)


def expand_grid(tree: dict[str, Any], limit: int | None = None) -> list[Expansion]:
    """Every combination of every `$list` (nested ones included); a `$range` is an error, and so is a grid
    of more than `limit` runs, found by counting before anything is expanded."""
    size = combinations(tree)
    if size is None:
        path = next(path for path, plain in iter_knobs(tree) if combinations(plain) is None)
        raise ExpansionError(f"{dotted(path)}: grid search takes only $list knobs, not a $range")
    if limit is not None and size > limit:
        raise ExpansionError(f"the grid has {size:,} combinations, more than the {limit:,} runs allowed (sweep.max_runs)")
    return _grid(Expansion(tree))


def _grid(start: Expansion) -> list[Expansion]:
    """Depth first, in sorted knob order, without recursion (a config may hold many knobs)."""
    results: list[Expansion] = []
    pending = [start]
    while pending:
        partial = pending.pop()
        first = next(iter_knobs(partial.config), None)
        if first is None:
            results.append(partial)
            continue
        path, plain = first
        knob = parse_knob(plain)
        assert isinstance(knob, ListKnob)
        choices = [_choose(partial, path, value, _list_label(knob, index)) for index, value in enumerate(knob.values)]
        pending.extend(reversed(choices))
    return results


def distinct_grid_size(tree: dict[str, Any], limit: int) -> int | None:
    """The number of distinct combinations when at most `limit` are to be expanded, else None (too many
    to count, or a `$range` makes them unbounded)."""
    size = combinations(tree)
    if size is None or size > limit:
        return None
    return len({expansion.key() for expansion in _grid(Expansion(tree))})


# Picks a knob's value by its dotted path: a candidate's index for a `$list`, a number for a `$range`.
Chooser = Callable[[str, Knob], Any]


def sample_with(tree: dict[str, Any], choose: Chooser) -> Expansion:
    """One concrete config, each knob (outermost first, nested ones once their candidate is chosen) set
    by `choose`: the seam through which random search and a study's sampler pick values."""
    partial = Expansion(tree)
    while (first := next(iter_knobs(partial.config), None)) is not None:
        path, plain = first
        knob = parse_knob(plain)
        if isinstance(knob, ListKnob):
            index = int(choose(dotted(path), knob))
            partial = _choose(partial, path, knob.values[index], _list_label(knob, index))
        else:
            value = knob.cast(choose(dotted(path), knob))
            partial = _choose(partial, path, value, format_value(value))
    return partial


def _sample(partial: Expansion, rng: random.Random) -> Expansion:
    def draw(_: str, knob: Knob) -> Any:
        return rng.randrange(len(knob.values)) if isinstance(knob, ListKnob) else knob.sample(rng.random())

    return sample_with(partial.config, draw)


def expand_random(tree: dict[str, Any], num_runs: int, seed: int) -> list[Expansion]:
    """`num_runs` distinct i.i.d. samples; a clear error when the space holds fewer."""
    size = distinct_grid_size(tree, EXACT_COUNT_FACTOR * num_runs)
    if size is not None and size < num_runs:
        raise ExpansionError(
            f"sweep.num_runs is {num_runs} but the knobs allow only {size} distinct combination(s); "
            f"lower num_runs to {size} or use strategy grid"
        )
    rng = random.Random(seed)
    chosen: dict[str, Expansion] = {}
    for _ in range(num_runs * MAX_DRAWS_PER_RUN):
        if len(chosen) == num_runs:
            break
        expansion = _sample(Expansion(tree), rng)
        chosen.setdefault(expansion.key(), expansion)
    if len(chosen) < num_runs:
        raise ExpansionError(
            f"found only {len(chosen)} distinct combination(s) in {num_runs * MAX_DRAWS_PER_RUN} draws "
            f"for sweep.num_runs {num_runs}; widen the knobs or lower num_runs"
        )
    return list(chosen.values())
