"""Asynchronous successive halving over chunks (ASHA, Li et al. 2018): `strategy: successive_halving`, and
an Optuna study's `pruner: asha`.

Rung k is reached after min_chunks * reduction_factor ** (k + min_early_stopping_rate) chunks, below the
run's own chunk count (a group may set its own `experiment.num_chunks`; `sweep.max_chunks` caps it). A run
that reaches a rung continues only if its metric is in the top 1/reduction_factor of the finite values seen
at that rung so far; at least one run with a finite value always continues. A NaN or infinite value
(the run diverged) is stopped at its rung, whatever the others did, and the decision says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.config.directions import diverged, sort_key
from finetune.search.contract import ChunkResult, Decision, Proposal, RunInfo, Verdict


@dataclass
class SuccessiveHalving:
    metric: str
    direction: str  # minimize | maximize
    min_chunks: int
    max_chunks: int | None  # None: each run's own chunk count
    reduction_factor: int = 2
    min_early_stopping_rate: int = 0
    rung_results: dict[int, dict[str, float]] = field(default_factory=dict)

    def rungs(self, total_chunks: int) -> list[int]:
        """Chunks done at the rungs of a run of `total_chunks` chunks (never its last: it has finished)."""
        limit = min(self.max_chunks or total_chunks, total_chunks)
        rungs, k = [], self.min_early_stopping_rate
        while (milestone := self.min_chunks * self.reduction_factor**k) < limit:
            rungs.append(milestone)
            k += 1
        return rungs

    def on_result(self, run_id: str, chunks_done: int, total_chunks: int, metrics: dict[str, float]) -> tuple[str, dict]:
        """("continue" | "stop", the decision's detail; empty where nothing was decided)."""
        if chunks_done not in self.rungs(total_chunks) or self.metric not in metrics:
            return "continue", {}
        value = float(metrics[self.metric])
        rung = self.rung_results.setdefault(chunks_done, {})
        rung[run_id] = value
        detail: dict[str, Any] = {"rung": chunks_done, "metric": self.metric, "value": value}
        if diverged(value):
            return "stop", detail | {"reason": f"{self.metric} is {value}: the run diverged"}
        finite = sorted((v for v in rung.values() if not diverged(v)), key=lambda v: sort_key(v, self.direction))
        keep = max(1, len(finite) // self.reduction_factor)
        cutoff = finite[keep - 1]
        good = sort_key(value, self.direction) <= sort_key(cutoff, self.direction)
        return ("continue" if good else "stop"), detail | {"cutoff": cutoff, "seen": len(rung), "finite": len(finite)}

    def replay(self, run_id: str, chunks_done: int, total_chunks: int, metrics: dict[str, float]) -> None:
        """A durable chunk's value, fed back after a restart."""
        if chunks_done in self.rungs(total_chunks) and self.metric in metrics:
            self.rung_results.setdefault(chunks_done, {})[run_id] = float(metrics[self.metric])


def halving_of(sweep: dict[str, Any]) -> SuccessiveHalving:
    return SuccessiveHalving(
        metric=sweep.get("metric", "eval_loss"),
        direction=sweep.get("direction") or "minimize",
        min_chunks=sweep.get("min_chunks", 1),
        max_chunks=sweep.get("max_chunks"),
        reduction_factor=sweep.get("reduction_factor", 2),
        min_early_stopping_rate=sweep.get("min_early_stopping_rate", 0),
    )


def replay_rungs(policy: SuccessiveHalving, runs: list[RunInfo], chunk_rows: list[dict[str, Any]]) -> None:
    """Feed the rung results of durable chunks (rows of the state store) of `runs` back after a restart."""
    totals = {run.run_id: run.total_chunks for run in runs}
    for row in chunk_rows:
        if row["run_id"] in totals:
            policy.replay(row["run_id"], row["chunk"] + 1, totals[row["run_id"]], row["metrics"])


class SuccessiveHalvingSearch:
    """strategy successive_halving as a searcher: it stops runs at its rungs and adds none."""

    def __init__(self, group: int, policy: SuccessiveHalving) -> None:
        self.group, self.policy = group, policy

    def measures(self, run: RunInfo, chunks_done: int) -> bool:
        return chunks_done in self.policy.rungs(run.total_chunks)

    def resume(self, runs: list[RunInfo], chunk_rows: list[dict[str, Any]]) -> list[Decision]:
        replay_rungs(self.policy, [run for run in runs if run.planned.group == self.group], chunk_rows)
        return []

    def on_chunk(self, run: RunInfo, result: ChunkResult, runs: list[RunInfo]) -> Verdict:
        if result.chunks_done >= run.total_chunks:
            return Verdict()
        decision, detail = self.policy.on_result(run.run_id, result.chunks_done, run.total_chunks, result.metrics)
        return Verdict(decision == "stop", [(f"sha_{decision}", detail)] if detail else [])

    def on_status(self, run: RunInfo) -> None:
        return None

    def propose(self, runs: list[RunInfo]) -> list[Proposal]:
        return []

    def accepted(self, proposal: Proposal, run_id: str) -> None:
        return None

    def rejected(self, proposal: Proposal, reason: str) -> None:
        return None
