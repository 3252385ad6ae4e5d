"""Which chunk checkpoints of a run stay on disk (`experiment.keep`): the last durable one, and with `best`
also the chunk with the best value of the ranking's metric (`search.ranking`), so at most two per run. And
the checkpoints a run starts with: a PBT clone's, inherited from its donor (`inherit_chunks`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config.directions import diverged
from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.control import CloneParent, RequestRejected
from finetune.schedule.store import StateStore
from finetune.search.ranking import better, ranking_rule


@dataclass
class CheckpointKeeper:
    plan: RunPlan
    root: Path
    best: dict[str, tuple[float, str]] = field(default_factory=dict)  # run -> (value, checkpoint) of its best chunk

    @property
    def keeps_best(self) -> bool:
        return self.plan.settings.keep == "best"

    def resume(self, chunk_rows: list[dict[str, Any]]) -> None:
        """The best chunk of each run among the durable ones still on disk."""
        if self.keeps_best:
            for row in chunk_rows:
                if Path(row["checkpoint"]).is_dir():
                    self._note(row["run_id"], row["metrics"], row["checkpoint"])

    def durable(self, run_id: str, previous: str | None, checkpoint: str, metrics: dict[str, float]) -> None:
        """A new durable chunk: remove what is no longer kept (the previous last, an older best)."""
        kept = {checkpoint}
        if self.keeps_best:
            replaced = self._note(run_id, metrics, checkpoint)
            if run_id in self.best:
                kept.add(self.best[run_id][1])
            if replaced and replaced != previous:
                self._remove(replaced)
        if previous and previous not in kept:
            self._remove(previous)

    def _note(self, run_id: str, metrics: dict[str, float], checkpoint: str) -> str | None:
        """Whether this chunk is the run's best; the checkpoint of the best it replaces, if any."""
        plan_rule = ranking_rule(self.plan)
        value = metrics.get(plan_rule.metric)
        if value is None or diverged(value):
            return None
        earlier = self.best.get(run_id)
        if earlier is not None and not better(value, earlier[0], plan_rule.direction):
            return None
        self.best[run_id] = (value, checkpoint)
        return earlier[1] if earlier is not None and earlier[1] != checkpoint else None

    def _remove(self, path: str) -> None:
        if Path(path).resolve().is_relative_to(self.root.resolve()):  # never outside this folder (a copy's is the original's)
            shutil.rmtree(path, ignore_errors=True)


def inherit_chunks(store: StateStore, root: Path, run: PlannedRun, parent: CloneParent) -> None:
    """A clone that continues `parent` (PBT's exploit) starts with the parent's durable chunks as its own: their
    rows (no time spent: nothing was trained for it) and a copy of the last one's full state."""
    assert parent.last_checkpoint is not None
    source = Path(parent.last_checkpoint)
    target = root / "runs" / run.run_id / source.name
    if not target.is_dir():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(source, tmp)
            tmp.rename(target)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RequestRejected([("", f"the parent's checkpoint could not be copied ({error})")]) from None
    store.add_run(run.run_id, run.label, len(run.derived.chunk_steps or []), run.parent_run_id)
    rows = sorted((row for row in store.chunk_rows(parent.run_id) if row["chunk"] < parent.durable_chunks),
                  key=lambda row: row["chunk"])
    if rows:
        store.inherit_metrics(run.run_id, parent.run_id, rows[-1]["global_step"])
    for row in rows:
        checkpoint = str(target) if row["chunk"] == parent.durable_chunks - 1 else row["checkpoint"]
        store.record_chunk(run.run_id, row["chunk"], row["global_step"], checkpoint, row["metrics"], 0.0, 0.0, 0.0,
                           row["started_at"], row["trained_at"])
