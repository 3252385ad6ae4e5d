"""The controller's side of experiment tracking: one parent run per experiment, one child per run.

`Tracker` is what it needs of a tracking backend (`finetune.track.mlflow_tracker.Tracker`); the
parent run's id is kept in `tracking.json` so that `finetune run --resume` continues it. Runs whose
`training_args.report_to` names wandb also log the same metrics to W&B (`finetune.track.wandb_tracker`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from finetune.io import write_json_atomic
from finetune.plan.model import PlannedRun
from finetune.schedule.records import RunRecord
from finetune.schedule.store import StateStore


class Tracker(Protocol):
    uri: str

    def parent_run(self, known_id: str | None) -> str: ...
    def child_run(self, parent_id: str, run: PlannedRun) -> str: ...
    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifacts(self, run_id: str, directory: str) -> None: ...
    def finish(self, run_id: str, status: str) -> None: ...


class ExperimentTracking:
    def __init__(self, tracker: Tracker, root: Path, store: StateStore) -> None:
        self.tracker, self.root, self.store = tracker, root, store
        self.parent_id: str | None = None
        self.wandb: Any = None  # WandbRuns, made when a run asks for W&B

    def start(self, records: list[RunRecord]) -> None:
        state_file = self.root / "tracking.json"
        self.parent_id = self.tracker.parent_run(_known_parent(state_file))
        write_json_atomic(state_file, {"parent_run_id": self.parent_id, "uri": self.tracker.uri})
        for record in records:
            if record.mlflow_run_id is None:
                self.add(record)

    def add(self, record: RunRecord) -> None:
        """A child run for `record` (once tracking has started; before, `start` adds it)."""
        if self.parent_id is None:
            return
        record.mlflow_run_id = self.tracker.child_run(self.parent_id, record.planned)
        self.store.set_mlflow_run(record.run_id, record.mlflow_run_id)

    def log_metrics(self, record: RunRecord | None, step: int, metrics: dict[str, float]) -> None:
        if record is not None and record.mlflow_run_id:
            self.tracker.log_metrics(record.mlflow_run_id, step, metrics)
            if (runs := self._wandb(record)) is not None:
                runs.log(record.run_id, record.mlflow_run_id, record.config, record.planned, step, metrics)

    def end(self, record: RunRecord, status: str, final_checkpoint: str | None = None) -> None:
        if not record.mlflow_run_id:
            return
        tracking = record.config.tracking
        if final_checkpoint and tracking is not None and tracking.log_artifacts:
            self.tracker.log_artifacts(record.mlflow_run_id, final_checkpoint)
        self.tracker.finish(record.mlflow_run_id, status)
        if (runs := self._wandb(record)) is not None:
            runs.end(record.run_id, record.mlflow_run_id, record.config, record.planned, status)

    def finish(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.tracker.finish(self.parent_id, status)
        if self.wandb is not None:
            self.wandb.close()

    def _wandb(self, record: RunRecord) -> Any:
        """The experiment's W&B runs when this run's report_to names wandb, else None."""
        from finetune.track.wandb_tracker import WandbRuns, wants_wandb

        if not wants_wandb(record.config):
            return None
        if self.wandb is None:
            tracking = record.config.tracking
            self.wandb = WandbRuns(self.root, tracking.experiment_name if tracking else record.config.experiment.name)
        return self.wandb


def _known_parent(state_file: Path) -> str | None:
    """The MLflow parent run of an earlier start; None (a new parent) if the file is missing or unreadable."""
    try:
        known = json.loads(state_file.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    parent = known.get("parent_run_id") if isinstance(known, dict) else None
    return parent if isinstance(parent, str) else None
