"""The controller's side of experiment tracking: one parent run per experiment, one child per run.

`Tracker` is what it needs of a tracking backend (`finetune.track.mlflow_tracker.Tracker`, which the command
gives it: nothing here imports `finetune.track`, a layer above); the parent run's id is kept in `tracking.json`
so that `finetune run --resume` continues it. A run whose backend offers a mirror for it (W&B, for runs whose
`training_args.report_to` names wandb) logs the same metrics there.
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
    def mirror(self, config: Any) -> Any: ...  # where else this run's metrics go (W&B's runs), or None
    def close(self) -> None: ...


class ExperimentTracking:
    def __init__(self, tracker: Tracker, root: Path, store: StateStore) -> None:
        self.tracker, self.root, self.store = tracker, root, store
        self.parent_id: str | None = None

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
            if (runs := self.tracker.mirror(record.config)) is not None:
                runs.log(record.run_id, record.mlflow_run_id, record.config, record.planned, step, metrics)

    def end(self, record: RunRecord, status: str, final_checkpoint: str | None = None) -> None:
        if not record.mlflow_run_id:
            return
        tracking = record.config.tracking
        if final_checkpoint and tracking is not None and tracking.log_artifacts:
            self.tracker.log_artifacts(record.mlflow_run_id, final_checkpoint)
        self.tracker.finish(record.mlflow_run_id, status)
        if (runs := self.tracker.mirror(record.config)) is not None:
            runs.end(record.run_id, record.mlflow_run_id, record.config, record.planned, status)

    def finish(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.tracker.finish(self.parent_id, status)
        self.tracker.close()


def _known_parent(state_file: Path) -> str | None:
    """The MLflow parent run of an earlier start; None (a new parent) if the file is missing or unreadable."""
    try:
        known = json.loads(state_file.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    parent = known.get("parent_run_id") if isinstance(known, dict) else None
    return parent if isinstance(parent, str) else None
