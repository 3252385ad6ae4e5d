"""How an experiment's runs are ranked: the same in `finetune report` and the dashboard.

By the sweep's metric when it names one; else by mean reward for GRPO (which has no validation
loss); else by eval_loss. A run's value is its latest evaluation, else its latest logged value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    return "eval_loss", "minimize"


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
