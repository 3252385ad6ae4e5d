"""`training_args` models, one per method, from the snapshot of TRL's config classes.

Keys that another section owns are errors that name that section: the batch sizes come
from `batchsize_conf`, the output directory from `experiment`, and so on.
"""

from __future__ import annotations

from finetune.config.snapshot_models import load_snapshot, model_from_snapshot

OWNED_BY_OTHER_SECTIONS: dict[str, str] = {
    "per_device_train_batch_size": "batchsize_conf.max_per_device_train_batch_size",
    "per_device_eval_batch_size": "batchsize_conf.per_device_eval_batch_size",
    "gradient_accumulation_steps": "batchsize_conf.total_train_batch_size (accumulation is derived from it)",
    "output_dir": "experiment.output_dir",
    "resume_from_checkpoint": "run_conf.resume_from_checkpoint",
    "run_name": "tracking.run_name",
}

OWNED_PER_METHOD: dict[str, dict[str, str]] = {
    "sft": {
        "max_length": "sft_args.max_seq_length",
        "max_seq_length": "sft_args.max_seq_length",
        "completion_only_loss": "sft_args.train_on_completions_only",
        "assistant_only_loss": "sft_args.train_on_completions_only",
        "packing": "sft_args.packing",
        "packing_strategy": "sft_args.packing (best-fit decreasing; an example is never split)",
        "eval_packing": "sft_args.packing (evaluation data is never packed)",
        "padding_free": "sft_args.padding_free",
    },
    "dpo": {"max_length": "dpo_args.max_seq_length"},
    "grpo": {"max_prompt_length": "grpo_args.max_prompt_length"},
}


def owned_keys(method: str) -> dict[str, str]:
    return {**OWNED_BY_OTHER_SECTIONS, **OWNED_PER_METHOD[method]}


def _training_args_model(method: str) -> type:
    spec = load_snapshot("trl")["methods"][method]
    return model_from_snapshot(
        f"{method.upper()}TrainingArguments",
        spec["fields"],
        doc=f"Arguments of TRL's `{spec['class']}` (TRL {load_snapshot('trl')['trl_version']}), "
        "except those another section sets.",
        owned=owned_keys(method),
    )


SFTTrainingArguments = _training_args_model("sft")
DPOTrainingArguments = _training_args_model("dpo")
GRPOTrainingArguments = _training_args_model("grpo")
