"""Runs on several devices, trained for real: a gang of 2 CPU processes (gloo) against 1 process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.test_training import (
    _adapters, _wait_for_chunks, chunk_rows, demo_config, finetune, generate_from, small, start_experiment, states,
)

pytestmark = pytest.mark.slow
ON_CPU = ["--set", "experiment.devices=cpu", "--set", "training_args.learning_rate=1e-3", "--set", "peft_conf.peft_kwargs.r=4"]


def metrics(root: Path) -> dict[str, float]:
    """The final eval_loss by run label."""
    with sqlite3.connect(root / "state.db") as db:
        labels = dict(db.execute("SELECT run_id, label FROM runs").fetchall())
        rows = db.execute("SELECT run_id, metrics FROM chunks ORDER BY chunk").fetchall()
    return {labels[run_id]: json.loads(values)["eval_loss"] for run_id, values in rows}


def events(root: Path, kind: str) -> list[dict]:
    with sqlite3.connect(root / "state.db") as db:
        return [json.loads(row[0]) for row in db.execute("SELECT detail FROM events WHERE kind = ?", (kind,))]


def test_two_processes_reach_the_eval_loss_of_one_with_the_same_total_batch(tmp_path, demo_dir) -> None:
    import torch

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "gang")
    one_or_two = ["--set", "experiment.devices_per_run=!list [1, 2]"]
    plan = finetune(tmp_path, "plan", str(config), *small("gang", steps=12, chunks=3), *ON_CPU, *one_or_two)
    assert "8x1" in plan.stdout and "4x2" in plan.stdout and "2 ddp" in plan.stdout  # total batch 8 both ways
    finetune(tmp_path, "run", str(config), *small("gang", steps=12, chunks=3), *ON_CPU, *one_or_two)
    root = tmp_path / "runs" / "gang"
    assert set(states(root).values()) == {"completed"}
    losses = metrics(root)
    one, two = losses["devices_per_run=1"], losses["devices_per_run=2"]
    assert abs(one - two) / one < 0.01, losses
    gang_run = next(run for run, label in _labels(root).items() if label == "devices_per_run=2")
    state = torch.load(next((root / "runs" / gang_run).glob("chunk-*")) / "state.pt", weights_only=False)
    assert len(state["rng"]["ranks"]) == 2, "each rank's RNG state is kept, to resume exactly"
    assert (root / "runs" / gang_run / "checkpoint-final" / "adapter_model.safetensors").is_file()


def _labels(root: Path) -> dict[str, str]:
    with sqlite3.connect(root / "state.db") as db:
        return dict(db.execute("SELECT run_id, label FROM runs").fetchall())


def _workers(pid: int) -> list:
    """The experiment's worker processes, oldest first."""
    import psutil

    workers = [child for child in psutil.Process(pid).children(recursive=True) if "spawn" in " ".join(child.cmdline())]
    return sorted(workers, key=lambda child: child.create_time())


def test_sigkill_of_one_rank_retries_the_chunk_with_a_new_gang_and_records_no_half_chunk(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "rankkill")
    args = ["run", str(config), *small("rankkill", steps=40, chunks=4), *ON_CPU, "--set", "experiment.devices_per_run=2"]
    process = start_experiment(tmp_path, args)
    root = tmp_path / "runs" / "rankkill"
    _wait_for_chunks(root, 1, process)
    ranks = _workers(process.pid)
    assert len(ranks) == 2, "the gang's two ranks, and no idle one-device worker"
    ranks[1].kill()
    assert process.wait(timeout=400) == 0
    assert set(states(root).values()) == {"completed"}
    (run,) = states(root)
    assert chunk_rows(root) == [(run, chunk) for chunk in range(4)], "each chunk recorded once, none half"
    assert all("gang" in event["error"] and "exit code -9" in event["error"] for event in events(root, "chunk_lost"))
    leftovers = [path.name for path in (root / "runs" / run).iterdir() if path.name.startswith(".")]
    assert leftovers == [], "no partly written checkpoint is left behind"


def test_a_gang_run_interrupted_and_resumed_ends_as_if_never_interrupted(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "straight")
    common = [*small("x", steps=24, chunks=4), *ON_CPU, "--set", "experiment.devices_per_run=2", "--set", "peft_conf.peft_kwargs.lora_dropout=0.1"]
    finetune(tmp_path, "run", str(config), *common, "--set", "experiment.name=straight")
    process = start_experiment(tmp_path, ["run", str(config), *common, "--set", "experiment.name=resumed"])
    root = tmp_path / "runs" / "resumed"
    _wait_for_chunks(root, 2, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(1)
    finetune(tmp_path, "run", "--resume", str(root))
    assert set(states(root).values()) == {"completed"}
    assert _adapters(root) == _adapters(tmp_path / "runs" / "straight")


@pytest.mark.parametrize("example", ["sft-groups.yaml", "dpo.yaml", "grpo.yaml"])
def test_every_method_trains_on_a_gang_and_its_runs_take_turns_there(tmp_path, demo_dir, example) -> None:
    """sft-groups: two LoRA runs and two full fine-tunes share one gang, which holds one at a time, so
    every switch reloads a run from its checkpoint."""
    config = demo_config(tmp_path, demo_dir, example, "methods")
    finetune(tmp_path, "run", str(config), *small("methods", steps=4, chunks=2), "--set", "experiment.devices=cpu",
             "--set", "experiment.devices_per_run=2")
    root = tmp_path / "runs" / "methods"
    assert set(states(root).values()) == {"completed"}
    finals = sorted(root.glob("runs/*/checkpoint-final"))
    assert len(finals) == len(states(root))
    full = [final for final in finals if (final / "model.safetensors").is_file()]
    assert len(full) == (2 if example == "sft-groups.yaml" else 0)
    generate_from(full[0] if full else finals[0])
    for base in root.glob("base-models/*"):  # written by rank 0 alone: another rank's save has no weights
        assert (base / "config.json").is_file() and list(base.glob("*.safetensors")), sorted(p.name for p in base.iterdir())
