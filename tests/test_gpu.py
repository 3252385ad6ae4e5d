"""The same training on a CUDA device: bf16, and 4-bit quantization when bitsandbytes is present."""

from __future__ import annotations

import importlib.util
import json
import sqlite3

import pytest

from finetune.track.timeline import seconds_with_at_least, training_intervals
from tests.test_training import demo_config, finetune, small, states

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bf16_lora_sweep_on_gpu(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "gpu")
    finetune(tmp_path, "run", str(config), *small("gpu", steps=16, chunks=4), "--set", "experiment.devices=[0]",
             "--set", "training_args.bf16=true", "--set", "run_conf.model_args.dtype=bfloat16")
    root = tmp_path / "runs" / "gpu"
    assert set(states(root).values()) == {"completed"}
    with sqlite3.connect(root / "state.db") as db:
        devices = {row[0] for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_started'")}
    assert all('"cuda:0"' in detail for detail in devices)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_4bit_lora_on_gpu(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "q4")
    finetune(tmp_path, "run", str(config), *small("q4", steps=8, chunks=2), "--set", "experiment.devices=[0]",
             "--set", "quant_conf={quantization_type: bits-and-bytes, load_in_4bit: true, bnb_4bit_quant_type: nf4}",
             "--set", "peft_conf.peft_kwargs.r=!list [8]", "--set", "training_args.learning_rate=!list [1e-3]")
    assert set(states(tmp_path / "runs" / "q4").values()) == {"completed"}


@pytest.mark.parametrize("slots", ["2", "auto"])
def test_several_runs_share_one_gpu(tmp_path, demo_dir, slots) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "slots")
    finetune(tmp_path, "run", str(config), *small("slots", steps=16, chunks=4), "--set", "experiment.devices=[0]",
             "--set", f"experiment.runs_per_device={slots}")
    root = tmp_path / "runs" / "slots"
    assert set(states(root).values()) == {"completed"}
    with sqlite3.connect(root / "state.db") as db:
        workers = {json.loads(row[0])["worker"] for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_started'")}
    assert len(workers) >= 2, workers
    assert seconds_with_at_least(training_intervals(root), 2) > 0, "the slots took turns instead of training at once"


def test_resident_state_moves_between_gpu_and_cpu_memory_and_stays_exact(tmp_path, demo_dir) -> None:
    """A GPU budget too small for more than the active run: the others wait in pinned CPU memory."""
    from tests.test_training import _adapters

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "tiers")
    common = [*small("tiers", steps=12, chunks=4), "--set", "experiment.devices=[0]", "--set", "peft_conf.peft_kwargs.r=!list [4, 8]",
              "--set", "training_args.learning_rate=!list [1e-3]"]
    finetune(tmp_path, "run", str(config), *common, "--set", "experiment.gpu_state_budget_gb=1e-9")
    tight = tmp_path / "runs" / "tiers"
    finetune(tmp_path, "run", str(config), *[a.replace("experiment.name=tiers", "experiment.name=roomy") for a in common])
    roomy = tmp_path / "runs" / "roomy"
    assert _adapters(tight) == _adapters(roomy)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.skipif(_gpu_count() < 2, reason="a gang of two needs two GPUs")
def test_a_ddp_gang_over_two_gpus_matches_one_gpu(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "nccl")
    finetune(tmp_path, "run", str(config), *small("nccl", steps=12, chunks=3), "--set", "experiment.devices=[0, 1]",
             "--set", "training_args.learning_rate=1e-3", "--set", "peft_conf.peft_kwargs.r=4",
             "--set", "experiment.devices_per_run=!list [1, 2]")
    root = tmp_path / "runs" / "nccl"
    assert set(states(root).values()) == {"completed"}
    with sqlite3.connect(root / "state.db") as db:
        losses = [json.loads(row[0])["eval_loss"] for row in db.execute(
            "SELECT metrics FROM chunks WHERE chunk = 2 ORDER BY run_id")]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) / losses[0] < 0.01


def test_fsdp_on_one_gpu_matches_ddp_and_offload_trains(tmp_path, demo_dir) -> None:
    """A gang of one sharded with FSDP (fp32 master weights, bf16 compute), with and without its shards
    offloaded to CPU memory, against plain training on the same GPU."""
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "fsdp1")
    finetune(tmp_path, "run", str(config), *small("fsdp1", steps=8, chunks=2), "--set", "experiment.devices=[0]",
             "--set", "training_args.learning_rate=1e-4", "--set", "training_args.bf16=true",
             "--set", "peft_conf={peft_type: NO_PEFT}",
             "--set", "groups=[{}, {experiment: {distributed: fsdp}}, {experiment: {distributed: fsdp, fsdp_cpu_offload: true}}]")
    root = tmp_path / "runs" / "fsdp1"
    assert set(states(root).values()) == {"completed"}
    with sqlite3.connect(root / "state.db") as db:
        losses = [json.loads(row[0])["eval_loss"] for row in db.execute("SELECT metrics FROM chunks WHERE chunk = 1")]
    assert len(losses) == 3 and max(losses) - min(losses) < 0.01 * min(losses), losses
