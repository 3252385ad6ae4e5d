"""How a group's knob tree is an Optuna search space: one parameter per knob, named by its key path.

A `$list` is categorical (over its values, or over their indices when they are sub-configs), a `$range` an int
or float, log-scaled or not. A knob nested in a sub-config (a `$list` of sub-configs whose own knobs differ)
is a conditional parameter: its name carries a short digest of its own space, so that two sub-configs with a
knob at the same key but other values are two parameters, never one whose value space changes (which Optuna
refuses: "CategoricalDistribution does not support dynamic value space").
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable

from finetune.config.knobs import Knob, ListKnob, dotted, iter_knobs
from finetune.plan.expand import sample_with

if TYPE_CHECKING:
    import optuna

PRIMITIVES = (type(None), bool, int, float, str)


def top_level_names(tree: dict[str, Any]) -> set[str]:
    return {dotted(path) for path, _ in iter_knobs(tree)}


def _space(knob: Knob) -> str:
    plain = knob.values if isinstance(knob, ListKnob) else [knob.start, knob.end, knob.log, knob.is_int]
    return hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:8]


def parameter(name: str, knob: Knob, top: set[str]) -> tuple[str, optuna.distributions.BaseDistribution]:
    """The Optuna parameter of a knob: its name and distribution (as `Trial.suggest_*` makes them)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    param = name if name in top else f"{name}@{_space(knob)}"
    if isinstance(knob, ListKnob):
        primitive = all(isinstance(value, PRIMITIVES) for value in knob.values)
        return param, CategoricalDistribution(knob.values if primitive else list(range(len(knob.values))))
    if knob.is_int:
        return param, IntDistribution(int(knob.cast(knob.start)), int(knob.cast(knob.end)), log=knob.log)
    return param, FloatDistribution(float(knob.start), float(knob.end), log=knob.log)


def suggest_on(trial: optuna.Trial, tree: dict[str, Any]) -> Callable[[str, Knob], Any]:
    """The chooser of `plan.expand.sample_with` that asks `trial`."""
    top = top_level_names(tree)

    def choose(name: str, knob: Knob) -> Any:
        param, distribution = parameter(name, knob, top)
        if isinstance(knob, ListKnob):
            picked = trial.suggest_categorical(param, distribution.choices)  # type: ignore[attr-defined]
            if all(isinstance(value, PRIMITIVES) for value in knob.values):
                return next(index for index, value in enumerate(knob.values) if type(value) is type(picked) and value == picked)
            return picked
        if knob.is_int:
            return trial.suggest_int(param, int(knob.cast(knob.start)), int(knob.cast(knob.end)), log=knob.log)
        return trial.suggest_float(param, float(knob.start), float(knob.end), log=knob.log)

    return choose


def replayed(tree: dict[str, Any], knobs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(params, distributions) of the trial that chose `knobs` (a planned run's knob values), or None when the
    tree cannot make them (a run of another plan)."""
    top = top_level_names(tree)
    params: dict[str, Any] = {}
    distributions: dict[str, Any] = {}

    def choose(name: str, knob: Knob) -> Any:
        if name not in knobs:
            raise LookupError(name)
        value = knobs[name]
        param, distribution = parameter(name, knob, top)
        distributions[param] = distribution
        if isinstance(knob, ListKnob):
            index = next(i for i, candidate in enumerate(knob.values) if type(candidate) is type(value) and candidate == value)
            params[param] = value if all(isinstance(candidate, PRIMITIVES) for candidate in knob.values) else index
            return index
        params[param] = value
        return value

    try:
        sample_with(tree, choose)
    except (LookupError, StopIteration, ValueError):
        return None
    return params, distributions
