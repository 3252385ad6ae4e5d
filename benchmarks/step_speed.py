"""One run's optimizer step time: a plain PyTorch + PEFT loop, TRL's trainer by hand, and `finetune`.

The three train the same LoRA adapter on the same model and tokenised data, with the same batch
size, for `--warmup` steps and then `--steps` timed ones, each on a fresh copy of the model (plain
and finetune of every layout take turns step by step, so that the machine's load falls on all alike):
  (a) plain:    a loop written here: forward with the labels, backward, clip, AdamW, scheduler;
  (b) trl:      TRL's SFTTrainer built as a user would, `trainer.train()` (its own inner loop);
  (c) finetune: finetune's resident session (`train.session.RunSession.train_until`), which is
                what a worker runs for every chunk.
Each with three batch layouts: padded, padding-free rows (`sft_args.padding_free`) and packed rows
(`sft_args.packing`, whose steps train more examples). A step's time is the median of the timed
steps (data collation included). Prints the table and the ratios the issue sets targets for:
finetune / plain per step (target <= 1.3) and the padding-free layouts' training examples per
second against padded batches' (target >= 1.3).

CPU, demo model:  .venv/bin/python benchmarks/step_speed.py
CPU, a model whose steps are compute-bound, chats of varied length: ... --preset small --max-length 512
GPU, 0.7 B preset: python benchmarks/step_speed.py --preset 0.7b --device cuda --batch 8 --max-length 512
(add --attention flash_attention_2 where flash-attn is installed, --liger to add Liger's kernels)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = """
method: sft
experiment: {{name: step-speed, output_dir: {out}}}
data_conf:
  training_data: {{type: CONCATENATION, datasets: [{{path: {train}}}]}}
  validation_data: {{type: CONCATENATION, datasets: [{{path: {valid}}}]}}
  chat_template_name: chat-ml
  missing_pad_token_strategy: bos-repurpose
training_args: {{learning_rate: 1.0e-4, max_steps: {steps}, logging_steps: 10, seed: 42, bf16: {bf16},
                 use_liger_kernel: {liger}, lr_scheduler_type: linear, warmup_steps: 2}}
batchsize_conf: {{total_train_batch_size: {batch}, max_per_device_train_batch_size: {batch}}}
peft_conf:
  peft_type: LORA
  peft_kwargs: {{r: 16, lora_alpha: 16, lora_dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
run_conf: {{model: {model}, model_args: {{dtype: {dtype}{attention}}}}}
sft_args: {{max_seq_length: {max_length}, train_on_completions_only: true, {layout}}}
"""


def concrete_config(text: str, work: Path) -> Any:
    from finetune.config.loading import load_document
    from finetune.config.models import CONFIG_ADAPTER
    from finetune.plan.build import build_plan

    path = work / "step-speed.yaml"
    path.write_text(text)
    plan = build_plan(load_document(path))
    return CONFIG_ADAPTER.validate_python(plan.runs[0].config)


class Bench:
    """The model, tokenizer and data of one configuration, and fresh LoRA models on them."""

    def __init__(self, config: Any, device: str) -> None:
        from finetune.data.pipeline import input_pad_token_id, prepare_data, prepare_tokenizer
        from finetune.train.model import load_tokenizer

        self.config, self.device = config, device
        self.tokenizer = load_tokenizer(config)
        prepare_tokenizer(self.tokenizer, config.data_conf)
        self.pad_id = input_pad_token_id(self.tokenizer, config.data_conf)
        self.data = prepare_data(config, self.tokenizer)

    def fresh_model(self) -> Any:
        from finetune.train.adapter import attach_adapter
        from finetune.train.model import load_base_model

        model = load_base_model(self.config, len(self.tokenizer), self.device)
        return attach_adapter(model, None, self.config.peft_conf, [], "bench", seed=42)

    def collator(self) -> Any:
        from finetune.train.trainer import sft_collator

        return sft_collator(self.config, self.pad_id)

    def trainer(self, model: Any, out: Path, steps: int) -> Any:
        from finetune.plan.derive import derive
        from finetune.train.trainer import build_trainer

        derived = derive(self.config, len(self.data.train)).model_copy(update={"total_steps": steps})
        return build_trainer(self.config, derived, model, self.tokenizer, self.data.train, None, out, self.device, [], self.pad_id)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class PlainLoop:
    """What a hand-written PyTorch + PEFT loop does for a step, and nothing else."""

    def __init__(self, bench: Bench, total_steps: int) -> None:
        import torch
        from transformers import get_linear_schedule_with_warmup

        self.bench, self.model = bench, bench.fresh_model()
        self.model.train()
        self.params = [param for param in self.model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 2, total_steps)
        self.collate, self.rows = bench.collator(), bench.data.train
        self.batch_size = bench.config.batchsize_conf.max_per_device_train_batch_size
        self.order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(42)).tolist()
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bench.device.startswith("cuda"))
        self.steps = 0

    def step(self) -> None:
        import torch

        start = (self.steps * self.batch_size) % max(1, len(self.rows) - self.batch_size)
        examples = [self.rows[i] for i in self.order[start:start + self.batch_size]]
        batch = {key: value.to(self.bench.device) for key, value in self.collate(examples).items()}
        items = batch["labels"][..., 1:].ne(-100).sum()
        with self.autocast:
            loss = self.model(**batch, num_items_in_batch=items).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


class FinetuneLoop:
    """finetune's resident session, one optimizer step per call (a chunk trains many in a row)."""

    def __init__(self, bench: Bench, total_steps: int, out: Path) -> None:
        from finetune.train.session import RunSession

        trainer = bench.trainer(bench.fresh_model(), out / "finetune", total_steps)
        self.session = RunSession("bench", trainer, None, bench.device, total_steps)

    def step(self) -> None:
        self.session.train_until(self.session.step + 1)


def interleaved(loops: dict[Any, Any], steps: int, warmup: int, device: str) -> dict[Any, float]:
    """Median step time of each loop, the loops taking turns step by step, so that a change in the
    machine's load (other processes, CPU frequency) falls on all of them alike."""
    times: dict[Any, list[float]] = {name: [] for name in loops}
    for index in range(warmup + steps):
        for name, loop in loops.items():
            started = time.perf_counter()
            loop.step()
            synchronize(device)
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def trl_by_hand(bench: Bench, steps: int, warmup: int, out: Path) -> float:
    """TRL's own loop (`trainer.train()`), timed between its step-end callbacks."""
    from transformers import TrainerCallback

    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            synchronize(bench.device)
            marks.append(time.perf_counter())

    trainer = bench.trainer(bench.fresh_model(), out / "trl", steps + warmup)
    trainer.args.max_steps = steps + warmup
    trainer.add_callback(Marks())
    trainer.train()
    gaps = [later - earlier for earlier, later in zip(marks, marks[1:])]
    return statistics.median(gaps[max(0, warmup - 1):])


def demo_inputs(work: Path) -> tuple[Path, Path, Path]:
    from finetune.train.demo import init_demo

    demo = init_demo(work / "demo")
    return demo / "model", demo / "data" / "sft_train.jsonl", demo / "data" / "sft_valid.jsonl"


def preset_inputs(work: Path, preset: str, dtype: str, examples: int) -> tuple[Path, Path, Path]:
    """A Llama-shaped model of the preset's size (random weights) and chats of 1 to 16 exchanges, so
    that lengths vary as in real data (about 15 to 250 tokens)."""
    import random

    from benchmarks.gpu_sweep import PRESETS
    from finetune.train.demo import ModelShape, build_model, build_tokenizer, sft_records, write_jsonl

    rng = random.Random(7)
    records = iter(sft_records(examples * 16, seed=7))
    chats = []
    for _ in range(examples):
        exchanges = [next(records)["messages"] for _ in range(rng.randint(1, 16))]
        chats.append({"messages": [m for messages in exchanges for m in messages if m["role"] != "system"]})
    write_jsonl(work / "train.jsonl", chats[: examples - 32])
    write_jsonl(work / "valid.jsonl", chats[examples - 32:])
    shape = {**PRESETS, "small": (256, 688, 4, 4, 2)}[preset]
    tokenizer = build_tokenizer([m["content"] for chat in chats for m in chat["messages"]])
    build_model(tokenizer, shape=ModelShape(*shape), dtype=dtype).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return work / "model", work / "train.jsonl", work / "valid.jsonl"


LAYOUTS = {"padded": "padding_free: false", "padding_free": "padding_free: true", "packed": "packing: true"}


def examples_per_row(bench: Bench) -> float:
    rows = bench.data.train
    if "seq_lengths" not in rows.column_names:
        return 1.0
    return statistics.mean(len(lengths) for lengths in rows["seq_lengths"])


def measure(args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    """Per layout: seconds per step of each loop, and the examples one step trains."""
    if args.preset == "demo":
        model, train, valid = demo_inputs(work)
    else:
        model, train, valid = preset_inputs(work, args.preset, args.dtype, args.examples)
    on_gpu = args.device.startswith("cuda")
    attention = f", attn_implementation: {args.attention}" if args.attention else ""
    benches: dict[str, Bench] = {}
    loops: dict[tuple[str, str], Any] = {}
    total = args.steps + args.warmup
    for layout in args.layouts.split(","):
        text = CONFIG.format(out=work / "runs", train=train, valid=valid, steps=total, bf16=str(on_gpu).lower(),
                             liger=str(args.liger).lower(), batch=args.batch, model=model, dtype=args.dtype, attention=attention,
                             max_length=args.max_length, layout=LAYOUTS[layout])
        benches[layout] = bench = Bench(concrete_config(text, work), args.device)
        loops[layout, "plain"] = PlainLoop(bench, total)
        loops[layout, "finetune"] = FinetuneLoop(bench, total, work / layout)
    results: dict[str, dict[str, float]] = {layout: {} for layout in benches}
    for (layout, name), seconds in interleaved(loops, args.steps, args.warmup, args.device).items():
        results[layout][name] = seconds
    for layout, bench in benches.items():
        if not args.skip_trl:
            results[layout]["trl"] = trl_by_hand(bench, args.steps, args.warmup, work / layout)
        results[layout]["examples_per_step"] = args.batch * examples_per_row(bench)
        print(f"{layout}: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in results[layout].items()
                                        if name != "examples_per_step"), flush=True)
    return results


def report(results: dict[str, dict[str, float]]) -> dict[str, float]:
    loops = [name for name in ("plain", "trl", "finetune") if name in next(iter(results.values()))]
    print("\nseconds per optimizer step (median), and finetune's training examples per second")
    print(f"{'':14}" + "".join(f"{name:>10}" for name in loops) + f"{'examples/s':>12}")
    for layout, times in results.items():
        throughput = times["examples_per_step"] / times["finetune"]
        print(f"{layout:14}" + "".join(f"{times[name]:>10.4f}" for name in loops) + f"{throughput:>12.0f}")
    ratios = {f"finetune/plain {layout}": times["finetune"] / times["plain"] for layout, times in results.items()}
    if "trl" in loops:
        ratios.update({f"trl/plain {layout}": times["trl"] / times["plain"] for layout, times in results.items()})
    padded = results.get("padded")
    for layout in ("padding_free", "packed"):
        if padded and layout in results:
            mine = results[layout]
            ratios[f"{layout} vs padded, examples/s (finetune)"] = (
                (mine["examples_per_step"] / mine["finetune"]) / (padded["examples_per_step"] / padded["finetune"]))
    print()
    for name, value in ratios.items():
        target = ""
        if name.startswith("finetune/plain"):
            target = f" (target <= 1.3: {'met' if value <= 1.3 else 'missed'})"
        elif "vs padded" in name:
            target = f" (target >= 1.3: {'met' if value >= 1.3 else 'missed'})"
        print(f"{name}: {value:.2f}x{target}")
    return ratios


def layouts(text: str) -> str:
    unknown = [name for name in text.split(",") if name not in LAYOUTS]
    if unknown or not text:
        raise argparse.ArgumentTypeError(f"unknown layout {', '.join(unknown) or repr(text)}; choose from {', '.join(LAYOUTS)}")
    return text


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=["demo", "small", "tiny", "0.7b", "3b"],
                        help="demo (the offline demo model and data; default), or a model size with chats of varied "
                        "length: small (~10 M parameters, for the CPU), or gpu_sweep's tiny, 0.7b, 3b")
    parser.add_argument("--layouts", default="padded,padding_free,packed", type=layouts,
                        help=f"comma-separated batch layouts to compare, of {', '.join(LAYOUTS)} (default: all)")
    parser.add_argument("--skip-trl", action="store_true", help="leave out TRL's own loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--attention", default=None, help="run_conf.model_args.attn_implementation (default: transformers' choice)")
    parser.add_argument("--liger", action="store_true", help="training_args.use_liger_kernel (CUDA, with liger-kernel)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--examples", type=int, default=512, help="examples of a preset's synthetic data")
    parser.add_argument("--steps", type=positive, default=30, help="timed optimizer steps (default 30)")
    parser.add_argument("--warmup", type=positive, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    import torch

    from finetune.runtime import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="finetune-step-speed-") as work:
        results = measure(args, Path(work))
    ratios = report(results)
    if args.json_out:
        args.json_out.write_text(json.dumps({"seconds": results, "ratios": ratios, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
