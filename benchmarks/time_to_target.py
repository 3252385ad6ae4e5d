"""Time to a target: how long until some config reaches a given eval_loss (the metric RapidFire reports).

The 8 LoRA configs of `sweep_vs_sequential.py` on the demo model (CPU), or others (`--ranks`, `--rates`):

(a) sequential: each config as a plain TRL script (`plain_trl_sft.py`) run to its end, one after
    another, evaluating every 1/CHUNKS of its steps. Its time to target is when, running them in plan
    order, an evaluation first reaches the target; also given as the mean over random orders of the
    same measured runs (the order a user picks is luck);
(b) `finetune run` of the same configs as one sweep with pruning on: successive halving (default) or an
    Optuna study with successive-halving pruning (`--strategy optuna`). Its time to target is when the
    first chunk whose evaluation reaches the target was trained.

Targets: `--target`, or by default several near-best values: the best eval_loss any sequential config
ended with plus 20%, 10%, 5%, 2% and 1% of the spread between the worst first evaluation and that best.
Prints, for each target, both times and their ratio. The sweep trains whole embeddings as the TRL
scripts do (`modules_to_save`), so both reach comparable losses. Run: .venv/bin/python benchmarks/time_to_target.py [--strategy optuna] [--target 5.9]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sweep_vs_sequential import CHUNKS, CONFIG, RANKS, RATES, plain_script

SWEEPS = {
    "sha": "sweep: {{strategy: successive_halving, num_runs: {runs}, seed: 1, min_chunks: 1, reduction_factor: 2}}\n",
    "optuna": "sweep: {{strategy: optuna, num_runs: {runs}, seed: 1, max_concurrent_runs: 4, startup_runs: 2, "
              "pruner: successive_halving, min_chunks: 1, reduction_factor: 2}}\n",
}
ORDERS = 2000  # random orders of the sequential runs averaged


@dataclass
class SequentialRun:
    seconds: float  # the whole script, start to end
    evaluations: list[tuple[float, float]]  # (seconds since the script started, eval_loss)


def sequential(demo: Path, work: Path, steps: int, ranks: list[int], rates: list[float]) -> list[SequentialRun]:
    runs = []
    for r in ranks:
        for lr in rates:
            start = time.time()
            evals = plain_script(demo, work, steps, r, lr)
            runs.append(SequentialRun(time.time() - start, [(event["time"] - start, event["eval_loss"]) for event in evals]))
    return runs


def sequential_time_to(target: float, runs: list[SequentialRun]) -> float | None:
    """Running `runs` in this order: when an evaluation first reaches `target` (None: never)."""
    elapsed = 0.0
    for run in runs:
        reached = [at for at, loss in run.evaluations if loss <= target]
        if reached:
            return elapsed + min(reached)
        elapsed += run.seconds
    return None


def with_finetune(demo: Path, work: Path, steps: int, strategy: str, ranks: list[int],
                  rates: list[float]) -> tuple[float, list[tuple[float, float]]]:
    """The sweep's wall time and its chunks' (seconds since start when trained, eval_loss)."""
    config = work / f"target-{strategy}.yaml"
    text = CONFIG.format(out=work / "runs", demo=demo, chunks=CHUNKS, steps=steps, rates=rates, ranks=ranks)
    # The TRL scripts train whole embeddings (modules_to_save); finetune would train only the new token rows and
    # reach other losses, so it is told to do the same: the same configs, comparable eval_loss.
    text = text.replace("name: bench", f"name: target-{strategy}").replace(
        "target_modules: [q_proj, v_proj]}", "target_modules: [q_proj, v_proj], modules_to_save: [embed_tokens, lm_head]}")
    config.write_text(text + SWEEPS[strategy].format(runs=len(ranks) * len(rates)))
    start = time.time()
    subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(config)], capture_output=True, text=True, check=True, cwd=work)
    total = time.time() - start
    db = sqlite3.connect(work / "runs" / f"target-{strategy}" / "state.db")
    rows = db.execute("SELECT trained_at, metrics FROM chunks").fetchall()
    db.close()
    chunks = [(trained - start, json.loads(metrics)["eval_loss"]) for trained, metrics in rows
              if trained is not None and "eval_loss" in json.loads(metrics)]
    return total, chunks


SLACKS = (0.2, 0.1, 0.05, 0.02, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per config (32 = one epoch of the demo data)")
    parser.add_argument("--strategy", choices=sorted(SWEEPS), default="sha", help="finetune's pruning search")
    parser.add_argument("--target", type=float, default=None, help="the eval_loss to reach (default: several near the best)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the measurements here")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="LoRA ranks of the configs")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="learning rates of the configs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-target-"))
    work.mkdir(parents=True, exist_ok=True)
    from finetune.runtime import quiet_libraries
    from finetune.train.demo import init_demo

    quiet_libraries()
    demo = init_demo(work / "demo")
    ranks, rates = [int(r) for r in args.ranks.split(",")], [float(lr) for lr in args.rates.split(",")]
    print(f"{len(ranks) * len(rates)} LoRA configs of the demo model (r {ranks}, lr {rates}), {args.steps} steps each, "
          f"{CHUNKS} chunks; finetune with {args.strategy}; working in {work}")
    runs = sequential(demo, work, args.steps, ranks, rates)
    total, chunks = with_finetune(demo, work, args.steps, args.strategy, ranks, rates)
    if args.json_out:
        args.json_out.write_text(json.dumps({"sequential": [run.__dict__ for run in runs], "finetune": chunks, "total": total}))
    best = min(loss for run in runs for _, loss in run.evaluations[-1:])
    worst_first = max(run.evaluations[0][1] for run in runs)
    seq_total = sum(run.seconds for run in runs)
    print(f"sequential: best final eval_loss {best:.4f}, worst first evaluation {worst_first:.4f}; "
          f"finetune: best {min(loss for _, loss in chunks):.4f}")
    print(f"total wall time: sequential {seq_total:.1f}s, finetune {total:.1f}s ({seq_total / total:.2f}x)")
    targets = [args.target] if args.target is not None else [best + slack * (worst_first - best) for slack in SLACKS]
    print(f"{'target eval_loss':>18}{'sequential, plan order':>24}{'random orders':>15}{'finetune':>10}{'ratio':>8}")
    for target in targets:
        in_order = sequential_time_to(target, runs)
        shuffled = [sequential_time_to(target, random.Random(seed).sample(runs, len(runs))) for seed in range(ORDERS)]
        reached_seq = [t for t in shuffled if t is not None]
        mean_order = sum(reached_seq) / len(reached_seq) if reached_seq else None
        reached = [at for at, loss in chunks if loss <= target]
        ours = min(reached) if reached else None
        ratio = f"{mean_order / ours:7.2f}x" if mean_order and ours else "    n/a"
        print(f"{target:18.4f}{_seconds(in_order):>24}{_seconds(mean_order):>15}{_seconds(ours):>10}{ratio:>8}")
    print("ratio: sequential (mean over random orders) / finetune; n/a: not reached")


def _seconds(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "never"


if __name__ == "__main__":
    main()
