"""What a run leaves behind: its final checkpoint, the base model it needs, and merged exports.

A LoRA run's `checkpoint-final` is its adapter and the tokenizer; its `adapter_config.json` names
the base model it belongs on. When the chat template added tokens, that base is the original
model with grown embeddings, written once per experiment under `base-models/` (and linked from
each run as `save_name_if_new_basemodel`), not once per run. A merged model is written only on
request: `experiment.save_merged_model`, or `finetune export EXP RUN --merged`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from finetune.io import mkdir_under
from finetune.train.checkpoint import ADAPTER_WEIGHTS, FULL_WEIGHTS, own_hyperparameters, publish, save_weights


def save_base_once(model: Any, tokenizer: Any, target: Path) -> Path:
    """The base model with its grown vocabulary, written unless already there (by any worker)."""
    if (target / "config.json").is_file():
        return target.resolve()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    mkdir_under(target.parent.parent, tmp)  # <experiment>/base-models/: not made again where a moved folder was
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        publish(tmp, target)
    except OSError:  # another worker published it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target.resolve()


def method_args(config: Any) -> Any:
    return {"sft": config.sft_args, "dpo": getattr(config, "dpo_args", None), "grpo": getattr(config, "grpo_args", None)}[config.method]


def write_final(config: Any, run_id: str, root: Path, trainable: dict[str, Any], adapter_config: Any | None,
                base: Any, full_model: Any | None) -> Path:
    """`checkpoint-final`: the adapter (or the full model) with the tokenizer, loadable as it is."""
    run_dir = root / "runs" / run_id
    final = run_dir / config.run_conf.final_checkpoint_name
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    mkdir_under(root, tmp)
    if full_model is not None:
        full_model.save_pretrained(tmp, state_dict=trainable)
    else:
        save_weights(tmp, trainable, adapter_config)
    base.tokenizer.save_pretrained(tmp)
    publish(tmp, final)
    args = method_args(config)
    if base.saved_as is not None and args is not None:
        link = run_dir / args.save_name_if_new_basemodel
        if not link.exists():
            link.symlink_to(os.path.relpath(base.saved_as, run_dir), target_is_directory=True)
    if adapter_config is not None and config.experiment.save_merged_model:
        export_merged(final, run_dir / "checkpoint-merged")
    return final


def export_merged(adapter_dir: Path, target: Path) -> Path:
    """The adapter merged into its base model: a plain transformers model directory whose generation
    config and tokenizer end generation at the chat template's end-of-turn token."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    stop_at_end_of_turn(model, tokenizer)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish(tmp, target)
    return target


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token that ends a turn in the tokenizer's chat template (`<|im_end|>` for chat-ml), when it is not EOS."""
    from finetune.evaluate.generation import TURN_END_TOKENS

    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    found = next((token for token in TURN_END_TOKENS if token in vocab and token in template), None)
    return None if found == tokenizer.eos_token else found


def stop_at_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Make what serving reads stop at the end of the assistant's turn: the tokenizer's eos becomes the
    end-of-turn token and the generation config's eos_token_id lists it first, the old EOS after it
    (vLLM, TGI and transformers' pipelines read these files). Without it a chat-ml model whose EOS is
    `</s>` answers `... <|im_end|><|im_end|>.<|im_end|>...` up to its token limit."""
    turn_end = end_of_turn_token(tokenizer)
    if turn_end is None:
        return
    old_eos = tokenizer.eos_token_id
    tokenizer.eos_token = turn_end
    turn_end_id = tokenizer.convert_tokens_to_ids(turn_end)
    generation = model.generation_config
    generation.eos_token_id = [turn_end_id, *([old_eos] if old_eos is not None and old_eos != turn_end_id else [])]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else old_eos


def load_initial_checkpoint(session: Any, checkpoint: str) -> None:
    """`run_conf.resume_from_checkpoint` as a path: the weights a run starts from, and the optimizer
    moments and scheduler state where the checkpoint (HF's format, or a finetune chunk) has them. The
    run keeps its own optimizer settings (learning rate, betas, weight decay), step 0 and data order."""
    import torch
    from safetensors.torch import load_file

    directory = Path(checkpoint)
    if session.adapter_name is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(session.model, load_file(directory / ADAPTER_WEIGHTS), adapter_name=session.adapter_name)
    else:
        session.model.load_state_dict(load_file(directory / FULL_WEIGHTS), strict=False)
    if (directory / "optimizer.pt").is_file():
        with own_hyperparameters(session.trainer.optimizer):
            session.trainer.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
    if (directory / "scheduler.pt").is_file():
        session.trainer.lr_scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
