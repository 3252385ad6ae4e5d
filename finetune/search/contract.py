"""The contract between the controller and a searcher: what a searcher sees of runs and chunks, and what
it answers. Nothing here knows the controller: a searcher sees runs through `RunInfo` (the controller's
records satisfy it) and chunks through `ChunkResult`, and answers with a `Verdict`.

One chunk reports one record (`ChunkResult`): its evaluation merged with the training metrics a search
may rank by (GRPO's reward, DPO's reward accuracy and margins; `config.directions`), the step, and its
position in its lineage (a warm-start clone continues its parent's count). A searcher says which chunks it
needs measured (`Searcher.measures`): workers evaluate exactly there, carried in the task.

Plain Python without torch or optuna: searchers are tested against fakes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from finetune.config.directions import diverged
from finetune.plan.model import PlannedRun


class RunInfo(Protocol):
    """What a searcher knows of a run (the controller's `RunRecord` is one)."""

    planned: PlannedRun
    status: Any  # a `str` enum: "pending", "running", "stopped", "completed", "failed", "deleted"
    durable_chunks: int
    last_checkpoint: str | None

    @property
    def run_id(self) -> str: ...

    @property
    def total_chunks(self) -> int: ...

    @property
    def active(self) -> bool: ...

    @property
    def unfinished(self) -> bool: ...


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk of a run reports to the search."""

    run_id: str
    chunks_done: int  # the run's own chunks, this one included
    lineage_chunks: int  # chunks its lineage has trained (a warm-start clone counts its parent's too)
    step: int  # the optimizer step at the chunk's end
    metrics: dict[str, float]

    def value(self, metric: str) -> float | None:
        return self.metrics.get(metric)


@dataclass(frozen=True)
class NewRun:
    """A run made from the group's knob tree (a study's proposal), prepared and validated before it joins."""

    planned: PlannedRun


@dataclass(frozen=True)
class CloneOf:
    """A clone of a run of the experiment, as `finetune ctl clone` makes it: `--set` changes, and whether it
    starts from the parent's adapter (`warm_start`) or continues the parent's full durable state (`continues`:
    adapter, optimizer moments, schedule position, data position and RNG, with only the changed knobs
    different; PBT's exploit, as Ray Tune's)."""

    parent_run_id: str
    changes: tuple[str, ...]
    warm_start: bool = False
    continues: bool = False
    reason: dict[str, Any] = field(default_factory=dict)


Proposal = Union[NewRun, CloneOf]
Decision = tuple[str, dict[str, Any]]  # (event kind, detail) for the decision log


@dataclass
class Verdict:
    """A searcher's answer to a chunk's result: whether the run stops, the decisions to log, and runs to add at
    once, before the run stops (PBT's replacement of it). A decision that needs its runs added (`pending`) is
    logged only when one of them was added: a run whose replacements are all rejected goes on."""

    stop: bool = False
    events: list[Decision] = field(default_factory=list)
    add: list[Proposal] = field(default_factory=list)
    pending: list[Decision] = field(default_factory=list)


class Searcher(Protocol):
    """One group's search; `runs` are all the runs of the experiment (a searcher picks its group's)."""

    group: int

    def measures(self, run: RunInfo, chunks_done: int) -> bool:
        """Whether the search compares runs after `run`'s chunk that makes `chunks_done` (evaluated there)."""
        ...

    def resume(self, runs: list[RunInfo], chunk_rows: list[dict[str, Any]]) -> list[Decision]:
        """Catch up with what happened before a restart (durable chunks, run states); events to record."""
        ...

    def on_chunk(self, run: RunInfo, result: ChunkResult, runs: list[RunInfo]) -> Verdict: ...

    def on_status(self, run: RunInfo) -> None:
        """The run changed state (completed, stopped, failed, deleted, pending again)."""
        ...

    def propose(self, runs: list[RunInfo]) -> list[Proposal]:
        """Runs to add now (a slot is free, a clone is owed)."""
        ...

    def accepted(self, proposal: Proposal, run_id: str) -> None: ...

    def rejected(self, proposal: Proposal, reason: str) -> None: ...


def latest_metrics(chunk_rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """run_id -> chunks done -> metrics, of the durable chunks in the state store."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for row in chunk_rows:
        found.setdefault(row["run_id"], {})[row["chunk"] + 1] = row["metrics"]
    return found


def merge_training(evaluation: dict[str, float], logged: list[dict[str, float]], names: Any) -> dict[str, float]:
    """A chunk's record: its evaluation, plus the mean over the chunk's logging steps of each training metric
    `names(metric)` accepts (GRPO's reward, DPO's rewards/accuracies...). A NaN logged anywhere in the chunk
    makes the chunk's value NaN: a run that diverged is not averaged back to health."""
    merged = dict(evaluation)
    sums: dict[str, list[float]] = {}
    for logs in logged:
        for name, value in logs.items():
            if name not in evaluation and names(name):
                sums.setdefault(name, []).append(float(value))
    for name, values in sums.items():
        merged[name] = math.nan if any(diverged(value) for value in values) else sum(values) / len(values)
    return merged
