"""The controller's side of the search (`finetune.search`): it feeds the searchers one `ChunkResult` per
chunk and applies their answers.

Like a Ray Tune Searcher combined with its scheduler, a searcher sees each chunk's record and each run's
end, and answers with runs to stop and runs to add. Every run a searcher adds goes through interactive
control's code (`schedule.control`): a proposal is validated, prepared and derived exactly like a planned
run or a clone, and what fails is rejected with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from finetune.config.directions import is_training_metric
from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.control import CloneParent, CloneRequest, ControlTarget, RequestRejected, add_clone
from finetune.schedule.records import RunRecord
from finetune.search import searchers_for
from finetune.search.contract import ChunkResult, CloneOf, NewRun, Proposal, Searcher, merge_training

Event = tuple[Union[str, None], str, dict[str, Any]]  # (run_id, kind, detail) for the state store


class SearchTarget(ControlTarget, Protocol):
    """What the search needs of the controller: interactive control's interface, its records and its plan."""

    plan: RunPlan
    runs: dict[str, RunRecord]


def chunk_result(record: RunRecord, chunks_done: int, step: int, evaluation: dict[str, float],
                 logged: list[dict[str, float]]) -> ChunkResult:
    """The chunk's one record: its evaluation merged with the training metrics its method may be ranked by
    (their mean over the chunk's logging steps), the step and its lineage position."""
    method = record.config.method
    metrics = merge_training(evaluation, logged, lambda name: is_training_metric(method, name))
    return ChunkResult(record.run_id, chunks_done, record.planned.lineage_start + chunks_done, step, metrics)


@dataclass
class SearchDriver:
    """It feeds searchers and applies their answers through `SearchTarget`."""

    searchers: dict[int, Searcher] = field(default_factory=dict)

    def start(self, target: SearchTarget, chunk_rows: list[dict[str, Any]]) -> list[Event]:
        """Open the searchers of the plan and let them catch up; (run_id, event kind, detail) to record."""
        self.searchers = searchers_for(target.plan, target.root)
        runs = list(target.runs.values())
        return [(detail.pop("run_id", None), kind, detail)
                for searcher in self.searchers.values() for kind, detail in searcher.resume(runs, chunk_rows)]

    def measures(self, record: RunRecord, chunks_done: int) -> bool:
        """Whether the run's search compares it after this chunk (so its worker evaluates there)."""
        searcher = self.searchers.get(record.planned.group)
        return searcher is not None and searcher.measures(record, chunks_done)

    def on_chunk(self, target: SearchTarget, record: RunRecord, result: ChunkResult) -> tuple[bool, list[Event]]:
        """Whether the run stops after this chunk, and the events of the decision and of the runs it added."""
        searcher = self.searchers.get(record.planned.group)
        if searcher is None or not record.active:
            return False, []
        verdict = searcher.on_chunk(record, result, list(target.runs.values()))
        events: list[Event] = [(record.run_id, kind, detail) for kind, detail in verdict.events]
        added = self._add_all(target, searcher, verdict.add)
        replaced = not verdict.add or any(kind == "search_added" for _, kind, _ in added)
        if verdict.add and replaced:  # a decision that needed its runs is logged only when it took effect
            events += [(record.run_id, kind, detail) for kind, detail in verdict.pending]
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
    return add_clone(target, CloneParent.of(record), CloneRequest(proposal.changes, proposal.warm_start, proposal.continues))
