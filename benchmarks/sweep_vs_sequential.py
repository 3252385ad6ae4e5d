"""Time to a comparison: 8 LoRA configs of the demo model, 8 chunks each.

(a) sequential: each config as a plain TRL script in its own process, one after another,
    evaluating every 1/8 of its steps (what a user would do by hand);
(b) `finetune run` on the same 8 configs with the chunk scheduler.

Prints, for both: the time until every config has its first evaluation, the total wall
time, their ratios, and finetune's per-chunk switching overhead (chunk wall time beyond
its training and evaluation compute). Run: .venv/bin/python benchmarks/sweep_vs_sequential.py
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RANKS = (4, 8, 16, 32)
RATES = (1e-3, 3e-3)
CHUNKS = 8

CONFIG = """
method: sft
experiment: {{name: bench, output_dir: {out}, num_chunks: {chunks}, max_eval_samples: 32}}
data_conf:
  training_data: {{type: CONCATENATION, datasets: [{{path: {demo}/data/sft_train.jsonl}}]}}
  validation_data: {{type: CONCATENATION, datasets: [{{path: {demo}/data/sft_valid.jsonl}}]}}
  chat_template_name: chat-ml
training_args: {{learning_rate: !list {rates}, max_steps: {steps}, logging_steps: 1, seed: 42}}
batchsize_conf: {{total_train_batch_size: 8, max_per_device_train_batch_size: 8}}
peft_conf:
  peft_type: LORA
  peft_kwargs: {{r: !list {ranks}, lora_alpha: 16, target_modules: [q_proj, v_proj]}}
run_conf: {{model: {demo}/model, model_args: {{dtype: float32}}}}
sft_args: {{max_seq_length: 256}}
"""


def plain_script(demo: Path, work: Path, steps: int, r: int, lr: float) -> list[dict[str, float]]:
    """One config as a hand-written TRL script (`plain_trl_sft.py`): its evaluations, as it printed them."""
    output = subprocess.run(
        [sys.executable, str(HERE / "plain_trl_sft.py"), "--demo", str(demo), "--r", str(r), "--lr", str(lr),
         "--steps", str(steps), "--eval-every", str(steps // CHUNKS), "--output", str(work / f"seq-{r}-{lr}")],
        capture_output=True, text=True, check=True,
    ).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith('{"event": "eval"')]


def sequential(demo: Path, work: Path, steps: int) -> dict[str, float]:
    start = time.time()
    first_evals = []
    for r in RANKS:
        for lr in RATES:
            first_evals.append(plain_script(demo, work, steps, r, lr)[0]["time"])
    return {"first_comparison": max(first_evals) - start, "total": time.time() - start}


def with_finetune(demo: Path, work: Path, steps: int) -> dict[str, float]:
    config = work / "bench.yaml"
    config.write_text(CONFIG.format(out=work / "runs", demo=demo, chunks=CHUNKS, steps=steps, rates=list(RATES), ranks=list(RANKS)))
    start = time.time()
    subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(config)], capture_output=True, text=True, check=True, cwd=work)
    total = time.time() - start
    db = sqlite3.connect(work / "runs" / "bench" / "state.db")
    firsts = [row[0] for row in db.execute("SELECT MIN(finished_at) FROM chunks GROUP BY run_id")]
    wall, steps, eval_time, count = db.execute("SELECT SUM(seconds), SUM(step_seconds), SUM(eval_seconds), COUNT(*) FROM chunks").fetchone()
    return {
        "first_comparison": max(firsts) - start,
        "total": total,
        "chunks": count,
        "chunk_compute": steps / count,
        "eval": eval_time / count,
        # Everything a chunk costs beyond its optimizer steps and its evaluation: switching runs,
        # the CPU snapshot for the durable checkpoint, and a run's one-off set-up at its first chunk.
        "switch_overhead": (wall - steps - eval_time) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per config (32 = one epoch of the demo data)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from finetune.runtime import quiet_libraries
    from finetune.train.demo import init_demo

    quiet_libraries()
    demo = init_demo(work / "demo")
    configs = len(RANKS) * len(RATES)
    print(f"{configs} LoRA configs of the demo model, {args.steps} steps each, {CHUNKS} chunks; working in {work}")
    seq = sequential(demo, work, args.steps)
    ft = with_finetune(demo, work, args.steps)
    print(f"{'':28}{'sequential':>12}{'finetune':>12}{'ratio':>10}")
    print(f"{'time to first comparison (s)':28}{seq['first_comparison']:12.1f}{ft['first_comparison']:12.1f}{seq['first_comparison'] / ft['first_comparison']:9.1f}x")
    print(f"{'total wall time (s)':28}{seq['total']:12.1f}{ft['total']:12.1f}{seq['total'] / ft['total']:9.2f}x")
    print(f"per chunk: {ft['chunk_compute']:.3f}s of optimizer steps, {ft['eval']:.3f}s of evaluation, "
          f"{ft['switch_overhead']:.3f}s of switching overhead "
          f"({100 * ft['switch_overhead'] / ft['chunk_compute']:.0f}% of the steps' compute), over {ft['chunks']} chunks")


if __name__ == "__main__":
    main()
