"""`training_args.report_to: [wandb]`: a run logs to W&B what it logs to MLflow, at the same steps (W&B in
offline mode: no network; the test reads W&B's offline run file)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.test_training import demo_config, finetune, small

pytestmark = pytest.mark.slow
wandb = pytest.importorskip("wandb")

BLOCK = 32768  # W&B's transaction log (`run-<id>.wandb`) is LevelDB's log format behind a 7-byte header


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B transaction log"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = BLOCK - position % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind == 1:  # a whole record
            yield chunk
        elif kind == 2:  # first, middle, last fragments
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def wandb_history(path: Path) -> tuple[Any, dict[str, dict[int, float]]]:
    """(the run record, metric -> step -> value) of an offline W&B run."""
    from wandb.proto import wandb_internal_pb2

    run, history = None, {}
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[record.history.step.num] = value
    return run, history


def test_a_run_reporting_to_wandb_logs_there_the_metrics_it_logs_to_mlflow(tmp_path, demo_dir, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "wb")
    finetune(tmp_path, "run", str(config), *small("wb", steps=2, chunks=2), "--set", "training_args.learning_rate=1e-3",
             "--set", "peft_conf.peft_kwargs.r=4", "--set", "training_args.report_to=[wandb]")
    root = tmp_path / "runs" / "wb"

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (child,) = [run for run in client.search_runs([client.get_experiment_by_name("wb").experiment_id])
                if "mlflow.parentRunId" in run.data.tags]
    mlflow = {name: {entry.step: entry.value for entry in client.get_metric_history(child.info.run_id, name)}
              for name in child.data.metrics}
    assert {"loss", "eval_loss", "learning_rate"} <= set(mlflow) and len(mlflow["loss"]) == 2

    (log,) = root.glob("wandb/offline-run-*/run-*.wandb")
    run, history = wandb_history(log)
    assert run.run_id == child.info.run_id and run.run_group == "wb" and run.project == "wb"
    assert history.keys() == mlflow.keys()
    for name, steps in mlflow.items():
        assert history[name] == pytest.approx(steps, rel=1e-6), name  # MLflow keeps floats, W&B JSON numbers
    assert os.environ["WANDB_MODE"] == "offline"
