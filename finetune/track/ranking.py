"""How an experiment's runs are ranked in `finetune report`, the dashboard and `export EXP best`: the rules
are `search.ranking`'s; this reads them from the state store."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config.evaluation import directions_in
from finetune.plan.model import RunPlan
from finetune.schedule.store import RunRow, StateStore
from finetune.search.ranking import RankingRule, rank, ranking_rule, summaries_of


@dataclass(frozen=True)
class Ranked:
    rank: int
    row: RunRow
    value: float | None
    chunk: int | None = None  # chunks done when the value was measured
    checkpoint: str | None = None  # that chunk's checkpoint (kept with experiment.keep: best, or the last)
    note: str = ""  # stopped at chunk k, diverged, tie with..., measured at chunk k


def ranking_metric(plan: RunPlan) -> tuple[str, str]:
    """(metric, minimize | maximize) for the experiment."""
    rule = ranking_rule(plan)
    return rule.metric, rule.direction


def evaluation_metrics(plan: RunPlan) -> list[str]:
    """The eval_conf metrics of the experiment's runs (eval_loss first when there), in the order listed."""
    names: dict[str, None] = {}
    for run in plan.runs:
        names.update(dict.fromkeys(directions_in(run.config)))
    return sorted(names, key=lambda name: name != "eval_loss")


def ranked_runs(store: StateStore, plan: RunPlan, rule: RankingRule | None = None) -> list[Ranked]:
    rule = rule or ranking_rule(plan)
    rows = {row.run_id: row for row in store.runs()}
    summaries = summaries_of(list(rows.values()), store.chunk_rows(), rule, store.latest_metric(rule.metric))
    return [Ranked(standing.rank, rows[standing.run_id], standing.value, standing.chunk, standing.checkpoint, standing.note)
            for standing in rank(summaries, rule)]
