"""The same training on a CUDA device: bf16, and 4-bit quantization when bitsandbytes is present."""

from __future__ import annotations

import importlib.util
import sqlite3

import pytest

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
