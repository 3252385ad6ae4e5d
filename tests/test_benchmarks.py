"""The benchmark scripts run and print their figures (what they measure is not asserted: no timed tests)."""

from __future__ import annotations

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
    """The GPU benchmark with the same code on the CPU: a tiny preset, one sequential run extrapolated, two slots
    (one slot is the path of chunk_overhead.py's grid)."""
    out = run("gpu_sweep.py", "--preset", "tiny", "--device", "cpu", "--steps", "8", "--batch", "2", "--max-length", "512",
              "--extrapolate", "--runs-per-device", "2", "--work", str(tmp_path), "--json-out", str(tmp_path / "out.json"),
              cwd=tmp_path)
    assert re.search(r"runs_per_device=2 \(2 worker\(s\)\): first comparison [\d.]+s \([\d.]+x\)", out), out
    assert re.search(r"two or more runs training \d+% of the time", out) and "MB written per chunk" in out and "GPU busy n/a" in out
    assert set(json.loads((tmp_path / "out.json").read_text())) == {"sequential", "runs_per_device=2"}


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
