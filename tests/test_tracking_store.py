"""The MLflow store inside an experiment folder follows the folder when it is moved or copied."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune.track.mlflow_tracker import Tracker, local_uri


def artifact_places(folder: Path) -> tuple[str, str]:
    tracker = Tracker(local_uri(folder), "exp", folder / "mlartifacts")
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    runs = tracker.client.search_runs([tracker.experiment_id])
    return experiment.artifact_location, runs[0].info.artifact_uri


def test_a_copied_folder_logs_artifacts_into_the_copy_and_the_original_keeps_its_own(tmp_path) -> None:
    original = tmp_path / "original"
    original.mkdir()
    tracker = Tracker(local_uri(original), "exp", original / "mlartifacts")
    tracker.parent_run(None)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    location, run_uri = artifact_places(copy)
    assert location == (copy / "mlartifacts").resolve().as_uri() and run_uri.startswith(location + "/")
    location, run_uri = artifact_places(original)
    assert location == (original / "mlartifacts").resolve().as_uri() and run_uri.startswith(location + "/")
