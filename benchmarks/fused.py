"""Fused training against training the same LoRA runs by turns or on two slots, on the CPU with the demo model.

Two measurements, each for 4 runs (the demo grid, `example_configs/sft-lora-grid.yaml`: ranks 4 and 16
x learning rates 1e-3 and 1e-2, LoRA on all seven projections, batches of 8) and 8 runs (ranks 4, 8, 16,
32 x the two learning rates):

(a) the training alone, in one process: the runs' sessions built as a worker holds them (one adapter
    each on one shared base), trained `--steps` optimizer steps in `--chunks` chunks by turns (each
    run's chunk after the other's, as one worker does) or fused (all runs' chunks at once, one forward
    and backward per micro-step: `train.fused`). Building the sessions is not timed.
(b) the whole sweep, `finetune run` from start to end: `runs_per_device: 1`, `runs_per_device: 2` and
    `fuse: <runs>`, one torch thread per worker (so 1 and fused use one core, 2 uses two).
    The chat template is mistral-with-system, whose tokens the demo tokenizer has: chat-ml would add
    two tokens, whose trained rows do not fuse (`fused.fuse_problems`).

The machine may be shared with other work: the ways are measured in interleaved repeats (by turns,
fused, by turns, fused, ...) and each figure is the median of its repeats. Prints wall times,
examples/s and the ratios.

Run: .venv/bin/python benchmarks/fused.py [--steps 16 --chunks 4 --repeats 3 --sweep-repeats 1 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "example_configs" / "sft-lora-grid.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def grid(demo: Path, ranks: list[int], steps: int) -> dict[str, Any]:
    from finetune.config.models import CONFIG_ADAPTER

    configs = {}
    for rank in ranks:
        for lr in (1e-3, 1e-2):
            tree = {
                "method": "sft",
                "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": str(demo / "data" / "sft_train.jsonl")}]},
                              "validation_data": {"type": "NONE"}, "chat_template_name": "mistral-with-system",
                              "missing_pad_token_strategy": "bos-repurpose"},
                "training_args": {"learning_rate": lr, "max_steps": steps, "lr_scheduler_type": "linear", "warmup_steps": 2,
                                  "logging_steps": 1, "seed": 42},
                "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 8},
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
            f"experiment.num_chunks={chunks}", "experiment.threads_per_worker=1", "experiment.devices=cpu",
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads of (a) (one worker's share of a CPU)")
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
        times: dict[str, list[float]] = {"by turns": [], "fused": []}
        for repeat in range(args.repeats):
            for way, train in (("by turns", by_turns), ("fused", fused)):
                sessions = group_sessions(configs, work / f"{len(configs)}-{repeat}-{way}")
                times[way].append(train(sessions, bounds))
                del sessions
        examples = len(configs) * args.steps * 8
        turns, together = statistics.median(times["by turns"]), statistics.median(times["fused"])
        print(f"(a) training alone, {len(configs)} LoRA runs x {args.steps} steps x batch 8 ({examples} examples), "
              f"{args.threads} torch thread(s), median of {args.repeats} interleaved repeats:")
        print(f"  by turns (runs_per_device: 1): {turns:.2f}s, {examples / turns:.0f} examples/s   (all: "
              f"{', '.join(f'{t:.2f}' for t in times['by turns'])})")
        print(f"  fused:                         {together:.2f}s, {examples / together:.0f} examples/s   (all: "
              f"{', '.join(f'{t:.2f}' for t in times['fused'])})")
        print(f"  fused is {turns / together:.2f}x faster (target >= 2x)")
        figures[str(len(configs))] = {"by_turns": times["by turns"], "fused": times["fused"], "ratio": turns / together}
        if args.sweep_repeats:
            figures[f"sweep-{len(configs)}"] = measure_sweeps(work, demo, ranks, args.steps, args.chunks, args.sweep_repeats)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
