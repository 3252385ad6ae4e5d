"""Which way each metric is better: the one table that validation, the search and the ranking read.

Evaluation metrics take their direction from eval_conf (built-in ones from `BUILTIN_METRICS`, a custom
one from its own `direction`). Training metrics a search may rank by are the ones each method logs
while it trains: GRPO's rewards, DPO's reward accuracy and margins (and their evaluation twins). A
name outside both is not rankable: `validate` says so, naming the ones that are.
"""

from __future__ import annotations

import math
from typing import Literal

Direction = Literal["minimize", "maximize"]

# Metrics logged while training, per method, that a sweep may rank by: a chunk's value is their mean over
# the chunk's logging steps (`search.contract.merge_training`).
TRAINING_METRICS: dict[str, dict[str, Direction]] = {
    "sft": {},
    "dpo": {"rewards/accuracies": "maximize", "rewards/margins": "maximize", "rewards/chosen": "maximize"},
    "grpo": {"reward": "maximize"},
}
# DPO's evaluation reports the same rewards over the validation data (when it has some).
EVALUATION_EXTRAS: dict[str, dict[str, Direction]] = {
    "dpo": {"eval_rewards/accuracies": "maximize", "eval_rewards/margins": "maximize", "eval_rewards/chosen": "maximize"},
}
# GRPO logs one mean per reward function: rewards/<function>/mean, better higher.
TRAINING_PATTERNS: dict[str, tuple[tuple[str, str, Direction], ...]] = {
    "grpo": (("rewards/", "/mean", "maximize"),),
}


def training_direction(method: str, metric: str) -> Direction | None:
    """The direction of a metric `method`'s runs log while training and a search may rank by, else None."""
    if metric in TRAINING_METRICS.get(method, {}):
        return TRAINING_METRICS[method][metric]
    for prefix, suffix, direction in TRAINING_PATTERNS.get(method, ()):
        if metric.startswith(prefix) and metric.endswith(suffix) and len(metric) > len(prefix) + len(suffix):
            return direction
    return None


def rankable(method: str, evaluation: dict[str, str]) -> dict[str, str]:
    """Every metric a run of `method` whose eval_conf produces `evaluation` can be ranked by, with its
    direction. GRPO is not evaluated at chunk boundaries: only what it logs while training."""
    found = {} if method == "grpo" else dict(evaluation)
    if method != "grpo" and "eval_loss" in evaluation:
        found.update(EVALUATION_EXTRAS.get(method, {}))
    found.update(TRAINING_METRICS.get(method, {}))
    return found


def direction_of(method: str, evaluation: dict[str, str], metric: str) -> str | None:
    """`metric`'s own direction for runs of `method` (None: the runs do not produce it)."""
    return rankable(method, evaluation).get(metric) or training_direction(method, metric)


def is_training_metric(method: str, metric: str) -> bool:
    return training_direction(method, metric) is not None


def diverged(value: float | None) -> bool:
    """NaN or infinite: the run diverged. Ranks last, is stopped at its rung, is never a donor."""
    return value is not None and not math.isfinite(value)


def sort_key(value: float | None, direction: str) -> tuple[int, float]:
    """Best first under `sorted`: finite values in the direction, then diverged ones, then missing ones."""
    if value is None:
        return (2, 0.0)
    if not math.isfinite(value):
        return (1, 0.0)
    return (0, value if direction == "minimize" else -value)
