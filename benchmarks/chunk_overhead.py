"""What a chunk costs beyond its training and evaluation, as `state.db` records it (CPU).

Three experiments on the demo model:
  (a) the demo grid: 4 LoRA runs x 4 chunks x 8 optimizer steps (256 training examples);
  (b) one LoRA run on 20,000 examples in 8 chunks of 8 steps, whose data position moves on;
  (c) the demo grid again with `runs_per_device: 2`: two workers on the CPU, one torch thread each
      (and (a) is run with one thread too, so that the two compare).
For each chunk `state.db` has its wall time on the worker, the part in optimizer steps and the
part in evaluation; the rest is switching and bookkeeping. Prints that rest as a ratio of the step
time (target: <= 10%), (b)'s per-chunk rest against (a)'s, first chunk against last, and for (c)
the fraction of the training time during which two runs trained at once, with (c)'s wall time
against (a)'s.

Run: .venv/bin/python benchmarks/chunk_overhead.py
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "example_configs" / "sft-lora-grid.yaml"


def run_experiment(work: Path, demo: Path, name: str, overrides: list[str]) -> tuple[list[dict[str, float]], float]:
    """The chunks of the experiment, and its wall time."""
    config = work / f"{name}.yaml"
    config.write_text(EXAMPLE.read_text().replace("demo/", f"{demo}/"))
    args = ["--set", f"experiment.name={name}", "--set", f"experiment.output_dir={work / 'runs'}"]
    for override in overrides:
        args += ["--set", override]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(config), *args], check=True, capture_output=True, cwd=work)
    wall = time.perf_counter() - started
    db = sqlite3.connect(work / "runs" / name / "state.db")
    rows = db.execute("SELECT run_id, chunk, seconds, step_seconds, eval_seconds FROM chunks ORDER BY finished_at").fetchall()
    return [{"run": r, "chunk": c, "rest": s - st - ev, "steps": st, "eval": ev} for r, c, s, st, ev in rows], wall


def big_dataset(demo: Path, target: Path, count: int) -> Path:
    rows = (demo / "data" / "sft_train.jsonl").read_text().splitlines()
    target.write_text("\n".join(rows[i % len(rows)] for i in range(count)) + "\n")
    return target


def summary(label: str, chunks: list[dict[str, float]]) -> float:
    rest, steps, evals = (sum(c[key] for c in chunks) for key in ("rest", "steps", "eval"))
    ratio = rest / steps
    print(f"{label}: {len(chunks)} chunks; per chunk {steps / len(chunks):.3f}s steps, {evals / len(chunks):.3f}s evaluation, "
          f"{rest / len(chunks):.3f}s else = {100 * ratio:.1f}% of step time (target <= 10%)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--examples", type=int, default=20_000, help="training examples of experiment (b)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    from finetune.runtime import quiet_libraries
    from finetune.train.demo import init_demo

    quiet_libraries()
    demo = init_demo(work / "demo")
    from finetune.track.timeline import overlap_fraction, training_intervals

    grid_settings = ["training_args.max_steps=32", "experiment.num_chunks=4", "experiment.threads_per_worker=1"]
    grid, grid_wall = run_experiment(work, demo, "grid", [*grid_settings, "experiment.runs_per_device=1"])
    slots, slots_wall = run_experiment(work, demo, "slots", [*grid_settings, "experiment.runs_per_device=2"])
    data = big_dataset(demo, work / "big.jsonl", args.examples)
    big, _ = run_experiment(work, demo, "big", [
        "training_args.max_steps=64", "experiment.num_chunks=8", "peft_conf.peft_kwargs.r=!list [8]",
        "training_args.learning_rate=!list [1e-3]", f"data_conf.training_data.datasets=[{{path: {data}}}]",
    ])
    grid_ratio = summary("(a) demo grid, 4 runs x 4 chunks x 8 steps", grid)
    big_ratio = summary(f"(b) one run on {args.examples} examples, 8 chunks x 8 steps", big)
    slots_ratio = summary("(c) demo grid on 2 slots of the CPU", slots)
    overlap = overlap_fraction(training_intervals(work / "runs" / "slots"))
    print(f"(c) two runs trained at once {100 * overlap:.0f}% of the training time; wall time {slots_wall:.1f}s against "
          f"{grid_wall:.1f}s with one slot ({grid_wall / slots_wall:.2f}x), both with one torch thread per worker")
    later = [c["rest"] for c in grid if c["chunk"] > 0]
    print(f"switching cost per chunk after a run's first: grid {statistics.median(later):.4f}s (median); "
          f"{args.examples} examples: first chunk {big[0]['rest']:.4f}s, last chunk {big[-1]['rest']:.4f}s, "
          f"median of chunks 2..8 {statistics.median(c['rest'] for c in big[1:]):.4f}s")
    if args.json:
        print(json.dumps({"grid_rest_ratio": grid_ratio, "big_rest_ratio": big_ratio, "slots_rest_ratio": slots_ratio,
                          "slots_overlap": overlap, "grid": grid, "big": big}))


if __name__ == "__main__":
    main()
