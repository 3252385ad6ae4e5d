"""TRL's trainers used as libraries, built from a concrete config and its derived values.

A run's trainer is built once, on its first chunk, and kept with the run (`session.RunSession`):
its `training_step` computes each step's loss and gradients, its optimizer and LR schedule span
the whole run (`max_steps` is the run's total), and `evaluate` measures it at chunk boundaries.
Saving and evaluation inside `train()` are off: finetune decides both at chunk boundaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.plan.model import Derived

TRL_CONFIG_CLASSES = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}
TRL_TRAINER_CLASSES = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}


def trl_arguments(config: Any, derived: Derived, output_dir: Path, device: str) -> Any:
    """The TRL config object: the user's training_args plus what other sections and the plan decide."""
    import trl

    assert derived.total_steps is not None, "the data size must be known before training"
    from finetune.config.training_keys import ignored_keys

    user = config.training_args.model_dump(exclude_unset=True)
    # report_to is honoured by the controller (MLflow, W&B), not by HF's integration callbacks; keys finetune
    # ignores (noted at validate) never reach TRL, for configs that did not come through a file (clones, proposals).
    for key in {"report_to", "project", *ignored_keys(config.method)}:
        user.pop(key, None)
    values: dict[str, Any] = {
        "seed": 42,
        **user,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": derived.per_device_train_batch_size,
        "per_device_eval_batch_size": derived.per_device_eval_batch_size,
        "gradient_accumulation_steps": derived.gradient_accumulation_steps,
        "learning_rate": derived.learning_rate,
        "num_train_epochs": derived.num_train_epochs,
        "max_steps": derived.total_steps,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": device == "cpu",
        "save_only_model": False,
    }
    values.update(strategy_arguments(config.experiment.distributed, user))
    if config.method == "sft":
        values.update(max_length=None, dataset_kwargs={"skip_prepare_dataset": True})
    elif config.method == "dpo":
        values["max_length"] = config.dpo_args.max_seq_length
    return getattr(trl, TRL_CONFIG_CLASSES[config.method])(**values)


def strategy_arguments(strategy: str, user: dict[str, Any]) -> dict[str, Any]:
    """The TrainingArguments a strategy needs. DDP: none beyond this (accelerate wraps the model in DDP
    whenever the run's processes form a group). FSDP: none; the model arrives sharded
    (`sharded.shard_model`) and accelerate, which refuses FSDP on CPU processes, is kept out of it.
    (DeepSpeed is refused before any work: `preflight.check_distributed`.)"""
    if strategy.startswith("fsdp"):
        return {}
    # Every trainable weight of a LoRA or full fine-tune takes part in each forward: DDP need not search.
    return {"ddp_find_unused_parameters": user.get("ddp_find_unused_parameters", False)}


def sft_collator(config: Any, pad_id: int) -> Any:
    """Padding-free rows when asked for (packed rows always are), else padded batches. The rows are
    flattened into one only for flash-attention, whose cost grows with each sequence's length alone."""
    from finetune.data.collator import ChatCollator, PaddingFreeCollator
    from finetune.train.attention import VARLEN_KERNELS

    if config.sft_args.padding_free or config.sft_args.packing:
        return PaddingFreeCollator(pad_id, flatten=config.run_conf.model_args.attn_implementation in VARLEN_KERNELS)
    return ChatCollator(pad_id, config.data_conf.padding_side)


def build_trainer(
    config: Any,
    derived: Derived,
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any | None,
    output_dir: Path,
    device: str,
    callbacks: list[Any],
    input_pad_id: int | None = None,
) -> Any:
    import trl

    from finetune.train.attention import check_padding_free

    for key, problem in check_padding_free(config, lambda _: model.config):
        raise ValueError(f"{key}: {problem}")
    args = trl_arguments(config, derived, output_dir, device)
    trainer_cls = getattr(trl, TRL_TRAINER_CLASSES[config.method])
    common: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": train_dataset,
        "eval_dataset": eval_dataset,
        "processing_class": tokenizer,
        "callbacks": callbacks,
    }
    if config.method == "sft":
        pad_id = input_pad_id if input_pad_id is not None else tokenizer.pad_token_id
        common["data_collator"] = sft_collator(config, pad_id)
    elif config.method == "dpo" and config.dpo_args.reference_model:
        from transformers import AutoModelForCausalLM

        common["ref_model"] = AutoModelForCausalLM.from_pretrained(config.dpo_args.reference_model)
    elif config.method == "dpo" and config.peft_conf.peft_type == "NO_PEFT":
        # TRL would load the reference from the model's path, without the rows finetune added for the chat
        # template's tokens; the reference is the starting weights: a frozen copy of them.
        import copy

        common["ref_model"] = copy.deepcopy(model).requires_grad_(False).eval()
    elif config.method == "grpo":
        from finetune.train.rewards import resolve_reward

        common["reward_funcs"] = [resolve_reward(name, index, config.grpo_args.reward_timeout_s)
                                  for index, name in enumerate(config.grpo_args.reward_functions)]
        if eval_dataset is None:
            common.pop("eval_dataset")
    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_cls(**common)
    trainer.remove_callback(PrinterCallback)  # metrics go to the state store and MLflow instead
    return trainer
