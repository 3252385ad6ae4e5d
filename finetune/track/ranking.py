"""How an experiment's runs are ranked: the same in `finetune report` and the dashboard.

By the sweep's metric when it names one (in its direction, which the plan holds); else by mean reward
for GRPO (which has no validation loss); else by eval_loss, or eval_conf's first metric where it
has no eval_loss. A run's value is its latest evaluation, else its latest logged value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.config.evaluation import directions_in
from finetune.plan.model import RunPlan
from finetune.schedule.store import RunRow, StateStore


@dataclass(frozen=True)
class Ranked:
    rank: int
    row: RunRow
    value: float | None


def ranking_metric(plan: RunPlan) -> tuple[str, str]:
    """(metric, minimize | maximize) for the experiment."""
    for sweep in plan.sweeps:
        if "metric" in sweep:
            return sweep["metric"], sweep.get("direction", "minimize")
    if plan.runs and plan.runs[0].config.get("method") == "grpo":
        return "reward", "maximize"
    produced = directions_in(plan.runs[0].config) if plan.runs else {}
    if produced and "eval_loss" not in produced:  # eval_conf without eval_loss: its first metric
        return next(iter(produced.items()))
    return "eval_loss", "minimize"


def evaluation_metrics(plan: RunPlan) -> list[str]:
    """The eval_conf metrics of the experiment's runs (eval_loss first when there), in the order listed."""
    names: dict[str, None] = {}
    for run in plan.runs:
        names.update(dict.fromkeys(directions_in(run.config)))
    return sorted(names, key=lambda name: name != "eval_loss")


def ranked_runs(store: StateStore, plan: RunPlan) -> list[Ranked]:
    metric, direction = ranking_metric(plan)
    logged = store.latest_metric(metric)
    rows = [row for row in store.runs() if row.state != "deleted"]

    def value_of(row: RunRow) -> float | None:
        value: Any = row.latest_metrics.get(metric, logged.get(row.run_id))
        return None if value is None else float(value)

    values = {row.run_id: value_of(row) for row in rows}
    missing = float("inf") if direction == "minimize" else float("-inf")
    ordered = sorted(rows, key=lambda row: missing if values[row.run_id] is None else values[row.run_id],
                     reverse=direction == "maximize")
    return [Ranked(index, row, values[row.run_id]) for index, row in enumerate(ordered, start=1)]
