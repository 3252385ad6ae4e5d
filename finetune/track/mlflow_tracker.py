"""MLflow tracking: one parent run per experiment, one child run per config run.

Uses `MlflowClient` with explicit run ids (no global active run), so one controller can log
for many runs at once. Without a `tracking` section the store is a SQLite file in the
experiment directory (or `MLFLOW_TRACKING_URI` when set, as the Helm chart does).
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from finetune.plan.model import PlannedRun

MAX_PARAM_LENGTH = 500
LOCAL_STORE = "mlflow.db"  # the MLflow store inside the experiment folder, without a tracking section


def local_uri(experiment_dir: Path) -> str:
    return f"sqlite:///{(experiment_dir / LOCAL_STORE).resolve()}"


def tracking_uri(tracking: Any, experiment_dir: Path) -> str:
    if tracking is not None:
        return tracking.mlflow_server_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or local_uri(experiment_dir)


def relocate_artifacts(store: Path, old: str, new: str) -> None:
    """Point the experiment folder's own MLflow store at the folder's artifacts after the folder was
    moved or copied (MLflow keeps artifact locations absolute): otherwise a copy would log its
    artifacts into the original. Its `experiments` and `runs` tables have had these columns since
    MLflow 1.0."""
    with closing(sqlite3.connect(store)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (new, old))
        db.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE substr(artifact_uri, 1, ?) = ?",
                   (new, len(old) + 1, len(old), old))


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        items: dict[str, str] = {}
        for key, value in tree.items():
            items.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return {prefix: str(tree)[:MAX_PARAM_LENGTH]}


class Tracker:
    def __init__(self, uri: str, experiment_name: str, artifact_dir: Path, parent_run_name: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        location = artifact_dir.resolve().as_uri() if "://" not in uri or uri.startswith("sqlite") else None
        if experiment is None:
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
            if location and experiment.artifact_location != location and uri == local_uri(artifact_dir.parent):
                relocate_artifacts(artifact_dir.parent / LOCAL_STORE, experiment.artifact_location, location)
        self.parent_run_name = parent_run_name or experiment_name
        self.root = artifact_dir.parent
        self._wandb: Any = None  # the experiment's W&B runs, made when a run asks for W&B

    def parent_run(self, existing: str | None) -> str:
        if existing:
            return existing
        run = self.client.create_run(self.experiment_id, run_name=self.parent_run_name, tags={"finetune.role": "experiment"})
        return run.info.run_id

    def child_run(self, parent_id: str, run: PlannedRun) -> str:
        from mlflow.entities import Param

        child = self.client.create_run(
            self.experiment_id,
            run_name=f"{run.run_id} {run.label}",
            tags={"mlflow.parentRunId": parent_id, "finetune.run_id": run.run_id, "finetune.label": run.label},
        )
        params = {f"knob.{k}": str(v)[:MAX_PARAM_LENGTH] for k, v in run.knobs.items()}
        params.update(flatten(run.config, "config"))
        params.update(flatten(run.derived.model_dump(), "derived"))
        entries = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(entries), 100):
            self.client.log_batch(child.info.run_id, params=entries[start : start + 100])
        return child.info.run_id

    def log_metrics(self, mlflow_run_id: str, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, value, now, step) for name, value in metrics.items()]
        self.client.log_batch(mlflow_run_id, metrics=batch)

    def tag(self, mlflow_run_id: str, key: str, value: str) -> None:
        self.client.set_tag(mlflow_run_id, key, value)

    def log_artifacts(self, mlflow_run_id: str, directory: str) -> None:
        self.client.log_artifacts(mlflow_run_id, directory, artifact_path=Path(directory).name)

    def finish(self, mlflow_run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(mlflow_run_id, status=status)

    def mirror(self, config: Any) -> Any:
        """The experiment's W&B runs (`wandb_tracker.WandbRuns`) when this run's report_to names wandb, else None:
        they get the metrics MLflow gets."""
        from finetune.track.wandb_tracker import WandbRuns, wants_wandb

        if not wants_wandb(config):
            return None
        if self._wandb is None:
            tracking = config.tracking
            self._wandb = WandbRuns(self.root, tracking.experiment_name if tracking else config.experiment.name)
        return self._wandb

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.close()


def tracker_for(root: Path, plan: Any) -> Tracker:
    """The experiment's MLflow tracker, from the first run's `tracking` section (or the defaults)."""
    from finetune.config.validation import CONFIG_ADAPTER

    tracking = CONFIG_ADAPTER.validate_python(plan.first_config()).tracking
    return Tracker(
        tracking_uri(tracking, root),
        tracking.experiment_name if tracking else plan.experiment,
        root / "mlartifacts",
        tracking.run_name if tracking else None,
    )
