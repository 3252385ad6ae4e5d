"""The benchmark scripts run and print their figures (what they measure is not asserted: no timed tests)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=900, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_chunk_overhead_reports_ratios_of_step_time(tmp_path) -> None:
    out = run("chunk_overhead.py", "--work", str(tmp_path), "--examples", "2000", cwd=tmp_path)
    assert len(re.findall(r"= \d+\.\d% of step time", out)) == 3
    assert "first chunk" in out and "last chunk" in out
    assert re.search(r"two runs trained at once \d+% of the training time", out), out


def test_gpu_sweep_runs_its_cpu_path(tmp_path) -> None:
    """The GPU benchmark with the same code on the CPU: a tiny preset, one sequential run extrapolated, and a fused
    group of the 4 configs (one way only, to keep the suite short: a `runs_per_device` way runs the same
    `with_finetune`, and slots are tested in tests/test_slots.py)."""
    out = run("gpu_sweep.py", "--preset", "tiny", "--device", "cpu", "--steps", "8", "--batch", "2", "--max-length", "512",
              "--extrapolate", "--runs-per-device", "", "--fuse", "4", "--chat-template", "mistral-with-system",
              "--work", str(tmp_path), "--json-out", str(tmp_path / "out.json"), cwd=tmp_path)
    assert re.search(r"fuse=4 \(1 worker\(s\), [1-9]\d* fused group\(s\)\): first comparison [\d.]+s \([\d.]+x\)", out), out
    assert re.search(r"two or more runs training \d+% of the time", out) and "MB written per chunk" in out and "GPU busy n/a" in out
    assert "MFU n/a" in out and re.search(r"[\d,]+ tokens/s while training", out)
    figures = json.loads((tmp_path / "out.json").read_text())
    assert set(figures) == {"sequential", "fuse=4"}
    assert figures["fuse=4"]["tokens"] > 0 and figures["fuse=4"]["training_seconds"] > 0


def test_gpu_sweep_counts_the_model_flops_that_torch_counts(tmp_path) -> None:
    """The MFU estimate's model FLOPs per token, against torch's FLOP counter on a forward of the tiny (grouped-query)
    model: twice the forward's matrix products (forward, and backward to the activations of a frozen base) and
    1.5 times its attention products (forward and a backward of twice that, over half the row: causal)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_sweep
    finally:
        sys.path.remove(str(BENCHMARKS))
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model_dir, _, _ = gpu_sweep.build_inputs(tmp_path, "tiny", "float32", 80)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")  # attention as plain products
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    length = 64
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, model.config.vocab_size, (1, length)))
    counts = {str(op).split(".")[-1] if "." in str(op) else str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    products = sum(flops for op, flops in counts.items() if op in ("mm", "addmm")) / length
    attention = sum(flops for op, flops in counts.items() if op == "bmm") / length
    assert products > 0 and attention > 0, counts
    assert gpu_sweep.model_flops_per_token(model_dir, length) == pytest.approx(2 * products + 1.5 * attention, rel=1e-6)
    no_gpu = argparse.Namespace(peak_tflops=None, device="cpu", max_length=512)
    assert gpu_sweep.mfu(no_gpu, model_dir, {"tokens": 1000, "training_seconds": 1.0, "rows": 10}) is None
    peak = argparse.Namespace(peak_tflops=1e-6, device="cpu", max_length=512)
    assert gpu_sweep.mfu(peak, model_dir, {"tokens": 1000, "training_seconds": 2.0, "rows": 10}) == pytest.approx(
        1000 * gpu_sweep.model_flops_per_token(model_dir, 100) / 2.0 / 1e6)


def test_step_speed_compares_the_three_loops_in_every_layout(tmp_path) -> None:
    out = run("step_speed.py", "--steps", "3", "--warmup", "1", "--json-out", str(tmp_path / "out.json"), cwd=tmp_path)
    for layout in ("padded", "padding_free", "packed"):
        assert re.search(rf"finetune/plain {layout}: [\d.]+x", out), out
        assert re.search(rf"trl/plain {layout}: [\d.]+x", out), out
    assert re.search(r"packed vs padded, examples/s \(finetune\): [\d.]+x", out), out
    figures = json.loads((tmp_path / "out.json").read_text())
    assert set(figures["seconds"]) == {"padded", "padding_free", "packed"}
    # A packed row holds several of the demo's short examples: a step trains more of them.
    assert figures["seconds"]["packed"]["examples_per_step"] > 2 * figures["seconds"]["padded"]["examples_per_step"]


def test_fused_benchmark_prints_its_ratios(tmp_path) -> None:
    out = run("fused.py", "--steps", "2", "--chunks", "2", "--repeats", "1", "--sweep-repeats", "0", "--work", str(tmp_path), cwd=tmp_path)
    assert len(re.findall(r"fused is \d+\.\d\dx faster", out)) == 2, out
    assert len(re.findall(r"the ceiling is \d+\.\d\dx, fused reaches \d+% of it", out)) == 2, out
    assert "4 LoRA runs" in out and "8 LoRA runs" in out and "one run of batch 32" in out and "one run of batch 64" in out
