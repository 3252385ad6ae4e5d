"""Checks on a config tree that no single field's model can make: finite numbers anywhere (knob
candidates, range bounds, `--set` values, keys typed `Any` included), and how many runs a sweep
makes, counted before anything is expanded.
"""

from __future__ import annotations

import math
from typing import Any

from finetune.config.issues import ConfigIssue, Locator, short_repr
from finetune.config.knobs import LIST_KEY, Path, combinations, dotted, iter_knobs, knob_kind
from finetune.config.scheduling import DEFAULT_MAX_RUNS, MAX_RUNS_CEILING

INT64_MAX = 2**63 - 1
# Knobs in one config (nested ones included): far above a real sweep; expansion time grows with their number.
MAX_KNOBS = 100
FINITE_FORM = "a finite number: .inf, -.inf, .nan and numbers beyond ±1.8e308 (1e400 reads as .inf) are refused"
INTEGER_FORM = f"an integer within ±{INT64_MAX} (64 bits)"


def number_problem(value: Any) -> tuple[str, str] | None:
    """(problem, allowed) for a number no config may hold, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number", FINITE_FORM
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return "an integer too large to use", INTEGER_FORM
    return None


def bad_numbers(tree: Any) -> list[Path]:
    """The paths of every non-finite float and out-of-range integer in the tree, in document order."""
    found = []
    pending: list[tuple[Path, Any]] = [((), tree)]
    while pending:
        path, node = pending.pop()
        if isinstance(node, dict):
            pending.extend(((*path, key), child) for key, child in reversed(list(node.items())))
        elif isinstance(node, list):
            pending.extend(((*path, index), child) for index, child in reversed(list(enumerate(node))))
        elif number_problem(node) is not None:
            found.append(path)
    return found


def number_issue(tree: Any, path: Path, locate: Locator, base: Path = ()) -> ConfigIssue:
    """The issue of the bad number at `path` in `tree`, which sits at `base` in the config."""
    value = tree
    for part in path:
        value = value[part]
    problem, allowed = number_problem(value)  # type: ignore[misc]
    full = (*base, *path)
    return ConfigIssue(dotted(full), str(locate(full)), problem, short_repr(value), allowed)


def _sweep(tree: dict[str, Any]) -> dict[str, Any]:
    sweep = tree.get("sweep")
    return sweep if isinstance(sweep, dict) else {}


def _count(value: Any, least: int = 1) -> int | None:
    """A valid count given in the config, else None (its own field reports what is wrong with it)."""
    valid = isinstance(value, int) and not isinstance(value, bool) and least <= value <= MAX_RUNS_CEILING
    return value if valid else None


def max_runs_of(tree: dict[str, Any]) -> int:
    return _count(_sweep(tree).get("max_runs")) or DEFAULT_MAX_RUNS


def runs_of(tree: dict[str, Any]) -> int | None:
    """How many runs a (group's) tree makes at most: its grid's combinations, or num_runs; None if not known."""
    sweep = _sweep(tree)
    if sweep.get("strategy", "grid") == "grid":
        return combinations(tree)
    return _count(sweep.get("num_runs"))


def run_count_issues(tree: dict[str, Any], locate: Locator) -> list[ConfigIssue]:
    """Too many knobs, or a grid of more runs than sweep.max_runs: found by counting, never by expanding."""
    knobs = _all_knobs(tree)
    if len(knobs) > MAX_KNOBS:
        path = knobs[MAX_KNOBS]
        return [ConfigIssue(dotted(path), str(locate(path)), f"the config holds {len(knobs)} knobs, more than {MAX_KNOBS}",
                            allowed=f"at most {MAX_KNOBS} knobs (nested ones included); split the sweep into groups")]
    limit = max_runs_of(tree)
    if _sweep(tree).get("strategy", "grid") != "grid" or (size := combinations(tree)) is None or size <= limit:
        return []
    factors = " x ".join(str(_list_size(plain)) for _, plain in iter_knobs(tree))
    return [ConfigIssue(
        "sweep", str(locate(("sweep",))),
        f"the grid makes {size:,} runs ({factors} candidates), more than sweep.max_runs ({limit:,})",
        allowed=f"fewer candidates; strategy random with num_runs; or a larger sweep.max_runs "
                f"(at most {MAX_RUNS_CEILING:,})",
    )]


def total_runs_issue(groups: list[tuple[Path, dict[str, Any]]], top: dict[str, Any], locate: Locator) -> ConfigIssue | None:
    """The groups of one experiment together may make at most the top-level sweep.max_runs runs."""
    counts = [runs_of(tree) for _, tree in groups]
    known = [count for count in counts if count is not None]
    limit = max_runs_of(top)
    if len(groups) < 2 or len(known) < len(counts) or sum(known) <= limit:
        return None
    each = ", ".join(f"{dotted(prefix)}: {count:,}" for (prefix, _), count in zip(groups, known))
    return ConfigIssue(
        "groups", str(locate(("groups",))),
        f"the groups make {sum(known):,} runs in all ({each}), more than the top-level sweep.max_runs ({limit:,})",
        allowed=f"fewer runs per group, or a larger top-level sweep.max_runs (at most {MAX_RUNS_CEILING:,})",
    )


def _list_size(plain: dict[str, Any]) -> int:
    return combinations({"knob": plain}) or 0


def _all_knobs(tree: Any, base: Path = ()) -> list[Path]:
    found = []
    for path, plain in iter_knobs(tree):
        found.append((*base, *path))
        body = plain[knob_kind(plain)]
        if knob_kind(plain) == LIST_KEY and isinstance(body, list):
            for index, candidate in enumerate(body):
                found.extend(_all_knobs(candidate, (*base, *path, LIST_KEY, index)))
        if len(found) > MAX_KNOBS:
            break
    return found
