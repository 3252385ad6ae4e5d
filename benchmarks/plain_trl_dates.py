"""One LoRA SFT run of the date task as a user would write it by hand with TRL: the sequential baseline
of `real_task_decision.py`. Trains, then answers the held-out prompts greedily and scores exact match.

Prints one JSON line at the end: {"event": "final", "time": unix time, "exact_match": ..., "trained_at": unix time}.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


def read(path: str) -> list[dict]:
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()]


def as_prompt_completion(records: list[dict]) -> Dataset:
    return Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])


def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False) for r in records]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.eval()
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(a.strip() == r["messages"][-1]["content"].strip() for a, r in zip(answers, records)) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the model folder (SmolLM2 converted from its GGUF file)")
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--r", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=4, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=42, max_length=128,
    )
    peft = LoraConfig(r=args.r, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SFTTrainer(model=model, args=config, train_dataset=as_prompt_completion(read(args.train)),
                         processing_class=tokenizer, peft_config=peft)
    trainer.train()
    trained_at = time.time()
    score = exact_match(trainer.model, tokenizer, read(args.valid), args.max_new_tokens)
    print(json.dumps({"event": "final", "time": time.time(), "trained_at": trained_at, "exact_match": score}), flush=True)


if __name__ == "__main__":
    main()
