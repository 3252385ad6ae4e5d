"""Fused training against training the same LoRA runs by turns or on two slots, on the CPU with the demo model.

Three measurements, each for 4 runs (the demo grid, `example_configs/sft-lora-grid.yaml`: ranks 4 and 16
x learning rates 1e-3 and 1e-2, LoRA on all seven projections, batches of 8) and 8 runs (ranks 4, 8, 16,
32 x the two learning rates):

(a) the training alone, in one process: the runs' sessions built as a worker holds them (one adapter
    each on one shared base), trained `--steps` optimizer steps in `--chunks` chunks by turns (each
    run's chunk after the other's, as one worker does) or fused (all runs' chunks at once, one forward
    and backward per micro-step: `train.fused`). Building the sessions is not timed.
(c) the ceiling of (a): ONE run whose batch holds all the runs' rows (4 x 8 or 8 x 8), trained by the
    same trainer for the same steps. Fusing puts the same rows through the base per step, and each
    member adds its own adapter, loss and optimizer step on top, so no fused group can beat this run:
    by turns / (c) is the most fusing can give on this machine.
(b) the whole sweep, `finetune run` from start to end: `runs_per_device: 1`, `runs_per_device: 2` and
    `fuse: <runs>`, each with finetune's default threads (the machine's cores shared by the workers).
    The chat template is mistral-with-system, whose tokens the demo tokenizer has: chat-ml would add
    two tokens, whose trained rows do not fuse (`fused.fuse_problems`).

The machine may be shared with other work: the ways are measured in interleaved repeats (by turns,
fused, ceiling, by turns, ...) and each figure is the median of its repeats. Prints wall times,
examples/s and the ratios.

Run: .venv/bin/python benchmarks/fused.py [--steps 16 --chunks 4 --repeats 3 --sweep-repeats 1 --threads CORES]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "example_configs" / "sft-lora-grid.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def grid(demo: Path, ranks: list[int], steps: int, batch: int = 8, rates: tuple[float, ...] = (1e-3, 1e-2)) -> dict[str, Any]:
    from finetune.config.models import CONFIG_ADAPTER

    configs = {}
    for rank in ranks:
        for lr in rates:
            tree = {
                "method": "sft",
                "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": str(demo / "data" / "sft_train.jsonl")}]},
                              "validation_data": {"type": "NONE"}, "chat_template_name": "mistral-with-system",
                              "missing_pad_token_strategy": "bos-repurpose"},
                "training_args": {"learning_rate": lr, "max_steps": steps, "lr_scheduler_type": "linear", "warmup_steps": 2,
                                  "logging_steps": 1, "seed": 42},
                "batchsize_conf": {"total_train_batch_size": batch, "max_per_device_train_batch_size": batch},
                "peft_conf": {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                              "peft_kwargs": {"r": rank, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}},
                "run_conf": {"model": str(demo / "model"), "model_args": {"dtype": "float32"}},
                "sft_args": {"max_seq_length": 256, "train_on_completions_only": True},
            }
            configs[f"r{rank}_lr{lr:g}".replace(".", "p").replace("-", "m")] = CONFIG_ADAPTER.validate_python(tree)
    return configs


def by_turns(sessions: list[Any], bounds: list[int]) -> float:
    started = time.perf_counter()
    for bound in bounds:
        for session in sessions:
            session.train_until(bound)
    return time.perf_counter() - started


def fused(sessions: list[Any], bounds: list[int]) -> float:
    from finetune.train.fused import FusedGroup

    group = FusedGroup(sessions)
    started = time.perf_counter()
    for bound in bounds:
        group.train_until({session.run_id: bound for session in sessions})
    return time.perf_counter() - started


def sweep(work: Path, demo: Path, name: str, ranks: list[int], steps: int, chunks: int, settings: list[str]) -> float:
    """The wall time of `finetune run` on the demo grid with these ranks and settings."""
    config = work / "sweep.yaml"
    config.write_text(EXAMPLE.read_text().replace("demo/", f"{demo}/"))
    args = [f"experiment.name={name}", f"experiment.output_dir={work / 'sweeps'}", f"training_args.max_steps={steps}",
            f"experiment.num_chunks={chunks}", "experiment.devices=cpu",
            "data_conf.chat_template_name=mistral-with-system", f"peft_conf.peft_kwargs.r=!list {ranks}", *settings]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(config), *(part for arg in args for part in ("--set", arg))],
                   check=True, capture_output=True, cwd=work)
    return time.perf_counter() - started


def measure_sweeps(work: Path, demo: Path, ranks: list[int], steps: int, chunks: int, repeats: int) -> dict[str, list[float]]:
    runs = 2 * len(ranks)
    ways = {"runs_per_device: 1": ["experiment.runs_per_device=1"], "runs_per_device: 2": ["experiment.runs_per_device=2"],
            f"fuse: {runs}": ["experiment.runs_per_device=1", f"experiment.fuse={runs}"]}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for repeat in range(repeats):
        for index, (way, settings) in enumerate(ways.items()):
            times[way].append(sweep(work, demo, f"s{runs}-{repeat}-{index}", ranks, steps, chunks, settings))
    examples = runs * steps * 8
    base = statistics.median(times["runs_per_device: 1"])
    print(f"(b) whole sweep, {runs} runs x {steps} steps x batch 8 ({examples} examples), median of {repeats} interleaved repeat(s):")
    for way, walls in times.items():
        wall = statistics.median(walls)
        print(f"  {way:<20} {wall:7.1f}s  {examples / wall:6.1f} examples/s  {base / wall:.2f}x runs_per_device: 1   "
              f"(all: {', '.join(f'{t:.1f}' for t in walls)})")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each way")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of (a) and (c) (default: this machine's cores, as one worker has them)")
    parser.add_argument("--sweep-repeats", type=int, default=1, help="interleaved repeats of each way of (b); 0: skip (b)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    from finetune.runtime import quiet_libraries
    from finetune.train.demo import init_demo
    from finetune.train.fused import group_sessions

    torch.set_num_threads(args.threads)
    quiet_libraries()
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-fused-"))
    demo = init_demo(work / "demo")
    bounds = [round(args.steps * (chunk + 1) / args.chunks) for chunk in range(args.chunks)]
    figures: dict[str, Any] = {}
    for ranks in ([4, 16], [4, 8, 16, 32]):
        configs = grid(demo, ranks, args.steps)
        runs = len(configs)
        whole = grid(demo, [8], args.steps, batch=8 * runs, rates=(1e-3,))
        times: dict[str, list[float]] = {"by turns": [], "fused": [], "ceiling": []}
        for repeat in range(args.repeats):
            for way, train in (("by turns", by_turns), ("fused", fused), ("ceiling", by_turns)):
                sessions = group_sessions(whole if way == "ceiling" else configs, work / f"{runs}-{repeat}-{way}")
                times[way].append(train(sessions, bounds))
                del sessions
        examples = runs * args.steps * 8
        turns, together, ceiling = (statistics.median(times[way]) for way in ("by turns", "fused", "ceiling"))
        print(f"(a) training alone, {runs} LoRA runs x {args.steps} steps x batch 8 ({examples} examples), "
              f"{args.threads} torch thread(s), median of {args.repeats} interleaved repeats:")
        for label, way in (("by turns (runs_per_device: 1):", "by turns"), ("fused:", "fused"),
                           (f"(c) ceiling, one run of batch {8 * runs}:", "ceiling")):
            wall = statistics.median(times[way])
            print(f"  {label:<40} {wall:.2f}s, {examples / wall:.0f} examples/s   (all: {', '.join(f'{t:.2f}' for t in times[way])})")
        print(f"  fused is {turns / together:.2f}x faster than by turns (target >= 2x); the ceiling is {turns / ceiling:.2f}x, "
              f"fused reaches {ceiling / together:.0%} of it")
        figures[str(runs)] = {"by_turns": times["by turns"], "fused": times["fused"], "ceiling": times["ceiling"],
                              "ratio": turns / together, "ceiling_ratio": turns / ceiling}
        if args.sweep_repeats:
            figures[f"sweep-{runs}"] = measure_sweeps(work, demo, ranks, args.steps, args.chunks, args.sweep_repeats)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
