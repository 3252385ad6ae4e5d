"""4 or 8 LoRA configs on one GPU: hand-written TRL scripts one after another vs `finetune run`.

No model hub: a Llama-shaped model with random weights is built locally at a preset size
(`--preset 0.7b` or `3b`; `tiny` runs anywhere, `--device cpu` included), with long synthetic chat
data (a few hundred tokens per example). Then the same LoRA configs (`--configs 4`: r 16 and 64 x two
learning rates; `--configs 8`: r 16, 32, 64 and 128) train (a) as the TRL script `plain_trl_sft.py`, one
process after another (or, with `--extrapolate`, one measured run times the number of configs), and (b)
with `finetune run`, 8 chunks each, once for each `runs_per_device` setting given (`--runs-per-device
1,2,4`) and once for each fused group size given (`--fuse 4,8`: one worker, `experiment.fuse: k`).
Fusing needs a chat template whose tokens the tokenizer has (new token rows do not fuse): pass
`--chat-template mistral-with-system` with `--fuse`. The sequential TRL scripts always use chat-ml, so
compare fused ways with each other and with `runs_per_device` (`--skip-sequential`), not with them.

Prints for each: time until every config has its first evaluation and total time, with their ratios
to the sequential scripts (the ideal first-comparison ratio of one slot is 6.25x for 4 x 8 chunks),
how busy the GPU was (nvidia-smi, sampled), the share of the training time during which two or more
runs trained at once, per-chunk seconds of optimizer steps, evaluation and everything else, and
bytes written per chunk. `--json-out FILE` keeps the figures.

Run on a GPU machine: python benchmarks/gpu_sweep.py --preset 0.7b --steps 400 --runs-per-device 1,2,4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATES = (1e-4, 3e-4)
RANKS = {4: (16, 64), 8: (16, 32, 64, 128)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM; PCIe and NVL cards differ: pass --peak-tflops
CHUNKS = 8
PRESETS = {  # hidden, intermediate, layers, heads, kv heads
    "tiny": (64, 128, 2, 4, 2),
    "0.7b": (2048, 5632, 16, 16, 8),
    "3b": (3072, 8192, 28, 24, 8),
}

CONFIG = """
method: sft
experiment: {{name: gpu-sweep, output_dir: {out}, num_chunks: {chunks}, max_eval_samples: 64, devices: {devices},
             runs_per_device: {slots}, fuse: {fuse}}}
data_conf:
  training_data: {{type: CONCATENATION, datasets: [{{path: {train}}}]}}
  validation_data: {{type: CONCATENATION, datasets: [{{path: {valid}}}]}}
  chat_template_name: {template}
  missing_pad_token_strategy: bos-repurpose
training_args: {{learning_rate: !list {rates}, max_steps: {steps}, logging_steps: 10, seed: 42, bf16: {bf16}}}
batchsize_conf: {{total_train_batch_size: {batch}, max_per_device_train_batch_size: {batch}}}
peft_conf:
  peft_type: LORA
  peft_kwargs: {{r: !list {ranks}, lora_alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
run_conf: {{model: {model}, model_args: {{dtype: {dtype}}}}}
sft_args: {{max_seq_length: {max_length}}}
"""


def build_inputs(work: Path, preset: str, dtype: str, examples: int) -> tuple[Path, Path, Path]:
    """The model (random weights at the preset's shape) and long chat data, made locally."""
    from finetune.train.demo import ModelShape, build_model, build_tokenizer, sft_records, write_jsonl

    records = sft_records(examples * 16, seed=7)
    conversations = []
    for start in range(0, len(records), 16):  # 16 exchanges: about 300 tokens with the template
        turns = [message for record in records[start : start + 16] for message in record["messages"] if message["role"] != "system"]
        conversations.append({"messages": turns})
    write_jsonl(work / "train.jsonl", conversations[: examples - 64])
    write_jsonl(work / "valid.jsonl", conversations[examples - 64 :])
    model_dir = work / f"model-{preset}"
    if not (model_dir / "config.json").is_file():
        tokenizer = build_tokenizer([m["content"] for c in conversations for m in c["messages"]])
        model = build_model(tokenizer, shape=ModelShape(*PRESETS[preset]), dtype=dtype)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        print(f"built a {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B-parameter model in {model_dir}", flush=True)
    return model_dir, work / "train.jsonl", work / "valid.jsonl"


class GpuBusy:
    """Samples nvidia-smi's utilization while a phase runs; None where there is no nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.running = False
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.running:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(0.5)

    def __enter__(self) -> GpuBusy:
        self.running = True
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False

    @property
    def percent(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def configs(args: argparse.Namespace) -> list[tuple[int, float]]:
    return [(r, lr) for r in RANKS[args.configs] for lr in RATES]


def sequential(args: argparse.Namespace, model: Path, train: Path, valid: Path, work: Path) -> dict[str, float]:
    every = configs(args)
    measured = every[:1] if args.extrapolate else every
    firsts, totals = [], []
    for r, lr in measured:
        start = time.time()
        out = subprocess.run(
            [sys.executable, str(HERE / "plain_trl_sft.py"), "--model", str(model), "--train", str(train), "--valid", str(valid),
             "--r", str(r), "--lr", str(lr), "--steps", str(args.steps), "--eval-every", str(args.steps // CHUNKS),
             "--batch", str(args.batch), "--max-length", str(args.max_length), "--device", args.device,
             "--output", str(work / f"seq-{r}-{lr}")],
            capture_output=True, text=True, check=True,
        ).stdout
        evals = [json.loads(line) for line in out.splitlines() if line.startswith('{"event": "eval"')]
        firsts.append(evals[0]["time"] - start)
        totals.append(time.time() - start)
    if args.extrapolate:
        firsts, totals = firsts * len(every), totals * len(every)
    return {"first_comparison": sum(totals[:-1]) + firsts[-1], "total": sum(totals)}


def with_finetune(args: argparse.Namespace, slots: str, fuse: str, model: Path, train: Path, valid: Path,
                  work: Path) -> dict[str, float]:
    from finetune.track.timeline import overlap_fraction, seconds_with_at_least, training_intervals

    config = work / "sweep.yaml"
    on_gpu = args.device == "cuda"
    config.write_text(CONFIG.format(
        out=work / "runs", chunks=CHUNKS, devices="[0]" if on_gpu else "cpu", slots=slots, fuse=fuse, train=train,
        valid=valid, rates=list(RATES), ranks=list(RANKS[args.configs]), template=args.chat_template, steps=args.steps,
        bf16=str(on_gpu).lower(), batch=args.batch, model=model, dtype="bfloat16" if on_gpu else "float32", max_length=args.max_length,
    ))
    shutil.rmtree(work / "runs", ignore_errors=True)
    start = time.time()
    subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(config)], check=True, capture_output=True, cwd=work)
    total = time.time() - start
    db = sqlite3.connect(work / "runs" / "gpu-sweep" / "state.db")
    firsts = [row[0] for row in db.execute("SELECT MIN(finished_at) FROM chunks GROUP BY run_id")]
    wall, steps, evals, count = db.execute("SELECT SUM(seconds), SUM(step_seconds), SUM(eval_seconds), COUNT(*) FROM chunks").fetchone()
    written = [json.loads(row[0])["bytes"] for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_durable'")]
    workers = len({json.loads(row[0])["worker"] for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_started'")})
    tokens = sum(json.loads(row[0]).get("tokens", 0) for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_done'"))
    groups = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'fused_group'").fetchone()[0]
    intervals = training_intervals(work / "runs" / "gpu-sweep")
    return {"first_comparison": max(firsts) - start, "total": total, "steps": steps / count, "eval": evals / count,
            "rest": (wall - steps - evals) / count, "bytes": sum(written) / max(1, len(written)), "workers": workers,
            "overlap": overlap_fraction(intervals), "tokens": tokens, "training_seconds": seconds_with_at_least(intervals, 1),
            "fused_groups": groups, "rows": len(configs(args)) * args.steps * args.batch}


def model_flops_per_token(model: Path, length: float) -> float:
    """A LoRA step's model FLOPs per trained token, for rows of `length` tokens: 4 x the parameters of the base's
    matrix products (a forward of 2, and a backward of 2 to the activations only: the base is frozen), plus
    attention's score and value products: 4 x (query width) x context forward and twice that backward, at a mean
    context of half the row under the causal mask. LoRA's own products are left out (under 1%)."""
    config = json.loads((model / "config.json").read_text())
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv_heads, inter = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // heads
    attention_width = heads * head_dim
    per_layer = hidden * attention_width * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter  # q, o; k, v; MLP
    parameters = layers * per_layer + vocab * hidden  # the output layer; the embedding lookup is no product
    return 4 * parameters + 3 * 4 * layers * attention_width * (length / 2)


def mfu(args: argparse.Namespace, model: Path, result: dict[str, float]) -> float | None:
    """Model FLOPs utilisation over the seconds during which any run trained (rows of the sweep's mean length);
    None off a GPU whose peak is known (H100 SXM and H200; `--peak-tflops` for any other)."""
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((value for card, value in PEAK_BF16_TFLOPS.items() if card in name and "PCIe" not in name
                     and "NVL" not in name), None)
    if not peak or not result["training_seconds"] or not result["rows"]:
        return None
    per_token = model_flops_per_token(model, result["tokens"] / result["rows"])
    return result["tokens"] * per_token / result["training_seconds"] / (peak * 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.7b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per config")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--runs-per-device", default="auto", help="finetune's experiment.runs_per_device; several: 1,2,4")
    parser.add_argument("--fuse", default="", help="fused group sizes to run too (experiment.fuse, one worker): 4,8")
    parser.add_argument("--configs", type=int, choices=sorted(RANKS), default=4, help="LoRA configs in the sweep")
    parser.add_argument("--chat-template", default="chat-ml", help="mistral-with-system for --fuse (its tokens exist)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--extrapolate", action="store_true", help="time one sequential TRL run and count it once per config")
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    if args.fuse and args.chat_template == "chat-ml":
        parser.error("--fuse needs --chat-template mistral-with-system: chat-ml adds tokens, whose rows do not fuse")
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-gpu-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    inputs = build_inputs(work, args.preset, "bfloat16" if args.device == "cuda" else "float32", args.steps * args.batch + 64)
    print(f"{len(configs(args))} LoRA configs, {args.steps} steps each, batch {args.batch} x <= {args.max_length} tokens, "
          f"{CHUNKS} chunks; working in {work}", flush=True)
    seq, seq_busy = None, None
    if not args.skip_sequential:
        with GpuBusy() as busy:
            seq = sequential(args, *inputs, work)
        seq_busy = busy.percent
    results: dict[str, dict[str, float | None]] = {"sequential": {**(seq or {}), "busy": seq_busy}}
    if seq:
        print(f"sequential TRL scripts: first comparison {seq['first_comparison']:.1f}s, total {seq['total']:.1f}s, "
              f"GPU busy {_percent(seq_busy)}", flush=True)
    count = len(configs(args))
    print(f"ideal first-comparison ratio with one slot for {count} x {CHUNKS} chunks: "
          f"{(count - 1 + 1 / CHUNKS) / (count / CHUNKS):.2f}x", flush=True)
    ways = [(f"runs_per_device={slots}", slots, "off") for slots in args.runs_per_device.split(",") if slots]
    ways += [(f"fuse={k}", "1", k) for k in args.fuse.split(",") if k]
    for label, slots, fuse in ways:
        with GpuBusy() as busy:
            ft = with_finetune(args, slots, fuse, *inputs, work)
        utilisation = mfu(args, inputs[0], ft)
        results[label] = {**ft, "busy": busy.percent, "mfu": utilisation}
        ratio = {key: f" ({seq[key] / ft[key]:.2f}x)" if seq else "" for key in ("first_comparison", "total")}
        print(f"finetune, {label} ({ft['workers']} worker(s), {ft['fused_groups']} fused group(s)): first comparison "
              f"{ft['first_comparison']:.1f}s{ratio['first_comparison']}, total {ft['total']:.1f}s{ratio['total']}, "
              f"{ft['tokens'] / max(ft['training_seconds'], 1e-9):,.0f} tokens/s while training, GPU busy {_percent(busy.percent)}, "
              f"MFU {_percent(None if utilisation is None else 100 * utilisation)}, "
              f"two or more runs training {100 * ft['overlap']:.0f}% of the time; per chunk {ft['steps']:.3f}s optimizer "
              f"steps, {ft['eval']:.3f}s evaluation, {ft['rest']:.3f}s else ({100 * ft['rest'] / ft['steps']:.1f}% of step "
              f"time); {ft['bytes'] / 1e6:.2f} MB written per chunk", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


if __name__ == "__main__":
    main()
