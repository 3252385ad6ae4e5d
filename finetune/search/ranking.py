"""How runs are ranked at the end: the same rules for `finetune report`, the dashboard, `export EXP best` and
the checkpoint `experiment.keep: best` keeps.

By the sweep's metric (every strategy may name one; direction normalised by the plan from the one table of
`config.directions`); else by GRPO's reward; else eval_loss, or eval_conf's first metric where it has no
eval_loss. A run's value is its final value (`sweep.rank_by: final`, the last evaluated chunk) or its best
(`rank_by: best`). Completed runs come first; a run that stopped early ranks below every run that got
further (labelled "stopped at chunk k of n"); a diverged run (NaN, inf) ranks last; ties and values
measured at different chunks are said, never ordered silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from finetune.config.directions import diverged, sort_key
from finetune.config.evaluation import directions_in
from finetune.plan.model import RunPlan


@dataclass(frozen=True)
class RankingRule:
    metric: str
    direction: str
    rank_by: str = "final"  # final | best


def ranking_rule(plan: RunPlan) -> RankingRule:
    """The experiment's metric, its direction and whether the final or the best value counts."""
    rank_by = next((sweep.get("rank_by") for sweep in plan.sweeps if sweep.get("rank_by")), "final")
    for sweep in plan.sweeps:
        if sweep.get("metric"):
            return RankingRule(sweep["metric"], sweep.get("direction") or "minimize", rank_by)
    if plan.runs and plan.runs[0].config.get("method") == "grpo":
        return RankingRule("reward", "maximize", rank_by)
    produced = directions_in(plan.runs[0].config) if plan.runs else {}
    if produced and "eval_loss" not in produced:  # eval_conf without eval_loss: its first metric
        metric, direction = next(iter(produced.items()))
        return RankingRule(metric, direction, rank_by)
    return RankingRule("eval_loss", "minimize", rank_by)


@dataclass(frozen=True)
class RunSummary:
    """What the ranking needs of a run: its state, progress and the metric at each durable chunk."""

    run_id: str
    state: str
    chunks_done: int
    total_chunks: int
    values: dict[int, float] = field(default_factory=dict)  # chunks done -> the metric's value after that chunk
    checkpoints: dict[int, str] = field(default_factory=dict)  # chunks done -> that chunk's checkpoint
    logged: float | None = None  # the latest logged value, for a run none of whose chunks has the metric


@dataclass(frozen=True)
class Standing:
    rank: int
    run_id: str
    value: float | None
    chunk: int | None  # the chunks done when the value was measured
    checkpoint: str | None  # that chunk's checkpoint
    note: str = ""


def chosen_value(summary: RunSummary, rule: RankingRule) -> tuple[float | None, int | None]:
    """(value, chunk) that ranks the run: its last measured value, or its best finite one."""
    if not summary.values:
        return summary.logged, None
    last = max(summary.values)
    if rule.rank_by == "best":
        finite = [(chunk, value) for chunk, value in summary.values.items() if not diverged(value)]
        if finite:
            chunk, value = min(finite, key=lambda item: (sort_key(item[1], rule.direction), item[0]))
            return value, chunk
    return summary.values[last], last


def better(value: float | None, than: float | None, direction: str) -> bool:
    return sort_key(value, direction) < sort_key(than, direction)


def rank(summaries: list[RunSummary], rule: RankingRule) -> list[Standing]:
    chosen = {summary.run_id: chosen_value(summary, rule) for summary in summaries}

    def key(summary: RunSummary) -> tuple:
        value = chosen[summary.run_id][0]
        return (diverged(value), summary.state != "completed", -summary.chunks_done, sort_key(value, rule.direction))

    ordered = sorted(summaries, key=key)
    finished_chunks = {chosen[s.run_id][1] for s in ordered if s.state == "completed" and chosen[s.run_id][1] is not None}
    standings = []
    for index, summary in enumerate(ordered, start=1):
        value, chunk = chosen[summary.run_id]
        notes = []
        if diverged(value):
            notes.append(f"diverged ({rule.metric} = {value})")
        if summary.state != "completed" and summary.state != "deleted":
            notes.append(f"{summary.state} at chunk {summary.chunks_done} of {summary.total_chunks}")
        ties = [other.run_id for other in ordered if other is not summary and key(other)[:3] == key(summary)[:3]
                and value is not None and not diverged(value) and chosen[other.run_id][0] == value]
        if ties:
            notes.append("tie with " + ", ".join(ties))
        if chunk is not None and (chunk != summary.chunks_done or len(finished_chunks) > 1):
            notes.append(f"measured at chunk {chunk}")
        checkpoint = summary.checkpoints.get(chunk) if chunk is not None else None
        standings.append(Standing(index, summary.run_id, value, chunk, checkpoint, "; ".join(notes)))
    return standings


def summaries_of(rows: list[Any], chunk_rows: list[dict[str, Any]], rule: RankingRule,
                 logged: dict[str, float]) -> list[RunSummary]:
    """Summaries from the state store's run rows and chunk rows (anything with those fields)."""
    values: dict[str, dict[int, float]] = {}
    checkpoints: dict[str, dict[int, str]] = {}
    for chunk in chunk_rows:
        if rule.metric in chunk["metrics"]:
            values.setdefault(chunk["run_id"], {})[chunk["chunk"] + 1] = float(chunk["metrics"][rule.metric])
            checkpoints.setdefault(chunk["run_id"], {})[chunk["chunk"] + 1] = chunk["checkpoint"]
    return [RunSummary(row.run_id, row.state, row.chunks_done, row.total_chunks, values.get(row.run_id, {}),
                       checkpoints.get(row.run_id, {}), logged.get(row.run_id))
            for row in rows if row.state != "deleted"]


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
