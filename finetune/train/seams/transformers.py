"""transformers' private APIs used by finetune (bounded in pyproject.toml: transformers>=5.19,<6).

Each function is the only place its private name is read; `tests/test_seams.py` checks that each still
exists and behaves as assumed here.
"""

from __future__ import annotations

from typing import Any


def prepare_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """`Trainer._prepare_inputs`: the micro-batch moved to the device (and context-parallel split) as the
    trainer does it. Public only inside `training_step`, which also switches the whole model to training
    mode on every micro-batch; `micro_step.MicroStep` runs the rest of `training_step` once per chunk."""
    return trainer._prepare_inputs(inputs)


def train_sampler(trainer: Any, dataset: Any) -> Any:
    """`Trainer._get_train_sampler(dataset)`: the sampler the trainer would draw a training epoch from (a
    random permutation, TRL's GRPO repeat sampler, length grouping). The public `get_train_dataloader`
    wraps it in a loader that accelerate re-seeds on its own; a run's epoch order must be a function of
    (seed, epoch) alone so that a chunk can resume at a saved position without reading the data before it."""
    return trainer._get_train_sampler(dataset)


def loss_is_scaled_for_ga(trainer: Any) -> bool | None:
    """`Trainer.loss_is_scaled_for_ga` (public, but only from transformers 5.19): whether `compute_loss`
    already divides by the step's item count. None: decide as `Trainer.training_step` does."""
    return trainer.loss_is_scaled_for_ga


def builds_packed_masks() -> bool:
    """Whether transformers turns position_id restarts into block-diagonal masks (`masking_utils`, an
    internal module: no public API says whether padding-free rows keep their examples apart)."""
    from transformers import masking_utils

    return hasattr(masking_utils, "find_packed_sequence_indices")


def causal_lm_builds_masks(model_type: str) -> tuple[bool, str]:
    """(safe, class name): whether the causal-LM class of `model_type` builds its masks with masking_utils,
    read from transformers' internal auto mapping and the modeling module's `create_causal_mask` import;
    no public API exposes how a model class builds its attention mask."""
    import sys

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if class_name is None:
        return False, f"model type {model_type!r}"
    module = sys.modules[getattr(transformers, class_name).__module__]
    return hasattr(module, "create_causal_mask"), class_name


def no_split_module_classes(model: Any) -> set[str]:
    """`PreTrainedModel._no_split_modules`: the names of the model's repeated block classes (its decoder
    layers), which accelerate's device maps read too; FSDP shards one unit per such block. No public API
    names them."""
    return set(getattr(model, "_no_split_modules", None) or ())


def checkpointing_requested(args: Any) -> bool:
    """Whether a config's (or TrainingArguments') `activation_checkpointing` or its older name
    `gradient_checkpointing` (the only name before transformers 5.2x) is on."""
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))


def enable_activation_checkpointing(model: Any, args: Any) -> None:
    """Activation checkpointing as `Trainer.train()` turns it on (public API, renamed within 5.x:
    `activation_checkpointing_enable` and `*_kwargs`, earlier `gradient_checkpointing_enable`)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if model.is_activation_checkpointing:
            return
        kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers,
                                              offload=offload)
    elif not model.is_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or None)
