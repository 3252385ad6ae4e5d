"""Search that learns as the experiment goes: the seam between the controller and a searcher.

Like a Ray Tune Searcher combined with its scheduler, a searcher sees each chunk's metrics and each run's
end, and answers with runs to stop and runs to add. Successive halving only stops runs; an Optuna study
(`schedule.optuna_search`) proposes new runs from its knob tree and prunes; population-based training
(`schedule.pbt`) stops the worst runs and adds warm-started, perturbed clones of the best. Every run a
searcher adds goes through interactive control's code (`schedule.control`): a proposal is validated,
prepared and derived exactly like a planned run or a clone, and what fails is rejected with its reason.

Plain Python without torch: a searcher is tested alone, without training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.control import CloneParent, CloneRequest, ControlTarget, RequestRejected, add_clone
from finetune.schedule.policy import SuccessiveHalving, replay_rungs, successive_halving_policies
from finetune.schedule.records import RunRecord


@dataclass(frozen=True)
class NewRun:
    """A run made from the group's knob tree (a study's proposal), prepared and validated before it joins."""

    planned: PlannedRun


@dataclass(frozen=True)
class CloneOf:
    """A clone of a run of the experiment, as `finetune ctl clone` makes it."""

    parent_run_id: str
    request: CloneRequest
    reason: dict[str, Any] = field(default_factory=dict)


Proposal = Union[NewRun, CloneOf]


@dataclass
class Verdict:
    """A searcher's answer to a chunk's result: whether the run stops, what to record (event kind, detail),
    and runs to add at once, before the run stops (PBT's replacement of it: a run whose replacements are
    all rejected goes on)."""

    stop: bool = False
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    add: list[Proposal] = field(default_factory=list)


Event = tuple[Union[str, None], str, dict[str, Any]]  # (run_id, kind, detail) for the state store


class Searcher(Protocol):
    """One group's search; `runs` are the records of the whole experiment (a searcher picks its group's)."""

    group: int

    def resume(self, runs: list[RunRecord], chunk_rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        """Catch up with what happened before a restart (durable chunks, run states); events to record."""
        ...

    def on_chunk(self, record: RunRecord, chunks_done: int, metrics: dict[str, float], runs: list[RunRecord]) -> Verdict: ...

    def on_status(self, record: RunRecord) -> None:
        """The run changed state (completed, stopped, failed, deleted, pending again)."""
        ...

    def propose(self, runs: list[RunRecord]) -> list[Proposal]:
        """Runs to add now (a slot is free, a clone is owed)."""
        ...

    def accepted(self, proposal: Proposal, run_id: str) -> None: ...

    def rejected(self, proposal: Proposal, reason: str) -> None: ...


class SearchTarget(ControlTarget, Protocol):
    """What the search needs of the controller: interactive control's interface, its records and its plan."""

    plan: RunPlan
    runs: dict[str, RunRecord]


class SuccessiveHalvingSearch:
    """strategy successive_halving as a searcher: it stops runs at its rungs and adds none."""

    def __init__(self, group: int, policy: SuccessiveHalving) -> None:
        self.group, self.policy = group, policy

    def resume(self, runs: list[RunRecord], chunk_rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        replay_rungs({self.group: self.policy}, {run.run_id: run.planned.group for run in runs}, chunk_rows)
        return []

    def on_chunk(self, record: RunRecord, chunks_done: int, metrics: dict[str, float], runs: list[RunRecord]) -> Verdict:
        if chunks_done >= record.total_chunks:
            return Verdict()
        decision, detail = self.policy.on_result(record.run_id, chunks_done, metrics)
        return Verdict(decision == "stop", [(f"sha_{decision}", detail)] if detail else [])

    def on_status(self, record: RunRecord) -> None:
        return None

    def propose(self, runs: list[RunRecord]) -> list[Proposal]:
        return []

    def accepted(self, proposal: Proposal, run_id: str) -> None:
        return None

    def rejected(self, proposal: Proposal, reason: str) -> None:
        return None


def searchers_for(plan: RunPlan, root: Path) -> dict[int, Searcher]:
    """One searcher per group whose strategy searches, by group index (optuna is imported only when used)."""
    found: dict[int, Searcher] = {}
    for group, policy in successive_halving_policies(plan.sweeps, plan.num_chunks).items():
        found[group] = SuccessiveHalvingSearch(group, policy)
    for group, sweep in enumerate(plan.sweeps):
        strategy = sweep.get("strategy")
        if strategy == "optuna":
            from finetune.schedule.optuna_search import OptunaSearch

            found[group] = OptunaSearch.open(plan, group, root)
        elif strategy == "pbt":
            from finetune.schedule.pbt import PopulationBasedTraining

            found[group] = PopulationBasedTraining.of(plan, group)
    return found


@dataclass
class SearchDriver:
    """The controller's side of the seam: it feeds searchers and applies their answers through `SearchTarget`."""

    searchers: dict[int, Searcher] = field(default_factory=dict)

    def start(self, target: SearchTarget, chunk_rows: list[dict[str, Any]]) -> list[Event]:
        """Open the searchers of the plan and let them catch up; (run_id, event kind, detail) to record."""
        self.searchers = searchers_for(target.plan, target.root)
        runs = list(target.runs.values())
        return [(detail.pop("run_id", None), kind, detail)
                for searcher in self.searchers.values() for kind, detail in searcher.resume(runs, chunk_rows)]

    def on_chunk(self, target: SearchTarget, record: RunRecord, chunks_done: int,
                 metrics: dict[str, float]) -> tuple[bool, list[Event]]:
        """Whether the run stops after this chunk, and the events of the decision and of the runs it added."""
        searcher = self.searchers.get(record.planned.group)
        if searcher is None or not record.active:
            return False, []
        verdict = searcher.on_chunk(record, chunks_done, metrics, list(target.runs.values()))
        events: list[Event] = [(record.run_id, kind, detail) for kind, detail in verdict.events]
        added = self._add_all(target, searcher, verdict.add)
        replaced = not verdict.add or any(kind == "search_added" for _, kind, _ in added)
        return verdict.stop and replaced, events + added

    def on_status(self, record: RunRecord) -> None:
        searcher = self.searchers.get(record.planned.group)
        if searcher is not None:
            searcher.on_status(record)

    def fill(self, target: SearchTarget) -> list[Event]:
        """Add the runs the searchers propose now; the events of what was added or rejected."""
        return [event for searcher in self.searchers.values()
                for event in self._add_all(target, searcher, searcher.propose(list(target.runs.values())))]

    def _add_all(self, target: SearchTarget, searcher: Searcher, proposals: list[Proposal]) -> list[Event]:
        events: list[Event] = []
        for proposal in proposals:
            try:
                run = _add(target, proposal)
            except RequestRejected as rejected:
                searcher.rejected(proposal, str(rejected))
                events.append((_parent_of(proposal), "search_rejected", {"group": searcher.group, "reason": str(rejected)}))
                continue
            searcher.accepted(proposal, run.run_id)
            detail = {"group": searcher.group, "parent": _parent_of(proposal), "trial": run.trial, "knobs": run.knobs}
            events.append((run.run_id, "search_added", detail | (proposal.reason if isinstance(proposal, CloneOf) else {})))
        return events


def _parent_of(proposal: Proposal) -> str | None:
    return proposal.parent_run_id if isinstance(proposal, CloneOf) else None


def _add(target: SearchTarget, proposal: Proposal) -> PlannedRun:
    """The proposal as a new run of the experiment, or `RequestRejected` saying why it cannot be one."""
    if isinstance(proposal, NewRun):
        if proposal.planned.run_id in target.run_ids():
            raise RequestRejected([("", f"an identical run exists ({proposal.planned.run_id})")])
        run = target.prepare(proposal.planned)
        target.add_run(run)
        return run
    record = target.record(proposal.parent_run_id)
    if record is None:
        raise RequestRejected([("", f"no run {proposal.parent_run_id}")])
    return add_clone(target, CloneParent.of(record), proposal.request)


def latest_metrics(chunk_rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """run_id -> chunks done -> metrics, of the durable chunks in the state store."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for row in chunk_rows:
        found.setdefault(row["run_id"], {})[row["chunk"] + 1] = row["metrics"]
    return found

