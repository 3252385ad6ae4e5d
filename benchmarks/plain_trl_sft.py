"""One LoRA SFT run as a user would write it by hand with TRL: the sequential baseline.

Prints one JSON line per evaluation: {"event": "eval", "time": unix time, "step": ..., "eval_loss": ...}.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore")

from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

CHAT_ML = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class ReportEvaluations(TrainerCallback):
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
        print(json.dumps({"event": "eval", "time": time.time(), "step": state.global_step, "eval_loss": (metrics or {}).get("eval_loss")}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", help="the demo directory: its model and SFT data")
    parser.add_argument("--model", help="model directory (default: DEMO/model)")
    parser.add_argument("--train", help="training JSONL (default: DEMO/data/sft_train.jsonl)")
    parser.add_argument("--valid", help="validation JSONL (default: DEMO/data/sft_valid.jsonl)")
    parser.add_argument("--r", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    model_dir = args.model or f"{args.demo}/model"

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_ML
    tokenizer.pad_token = tokenizer.bos_token
    on_gpu = args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="bfloat16" if on_gpu else "float32")
    model.resize_token_embeddings(len(tokenizer))
    train = load_dataset("json", data_files=args.train or f"{args.demo}/data/sft_train.jsonl", split="train")
    valid = load_dataset("json", data_files=args.valid or f"{args.demo}/data/sft_valid.jsonl", split="train")
    config = SFTConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        eval_strategy="steps", eval_steps=args.eval_every, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=not on_gpu, bf16=on_gpu, disable_tqdm=True, seed=42, max_length=args.max_length,
    )
    peft = LoraConfig(r=args.r, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=valid, processing_class=tokenizer,
                         peft_config=peft, callbacks=[ReportEvaluations()])
    trainer.train()
    trainer.save_model(f"{args.output}/final")


if __name__ == "__main__":
    main()
