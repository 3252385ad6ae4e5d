"""One micro-batch's forward and backward: `Trainer.training_step` without its per-call set-up.

HF's `training_step` switches the whole model to training mode (a walk over every module, ~2 ms a
call for a small LoRA model on the CPU) and rebuilds the same decisions on every micro-batch. A run's
session trains many micro-batches in a row in one mode, so `RunSession` sets the mode once per
chunk (`enter_training`) and calls `MicroStep` per micro-batch, which does the rest of
`training_step` unchanged: the trainer's input preparation, its loss context and `compute_loss`
(the method's loss, TRL's metrics), the loss scaling for gradient accumulation and the backward.

This replays transformers' and TRL's code: the private names it needs are in `finetune.train.seams`
(bounded in pyproject), and `tests/test_micro_step.py` trains the same steps through
`trainer.training_step` and through this and requires bitwise-equal weights. Trainers whose
`training_step` does more (GRPO and RLOO generate there) keep their own.
"""

from __future__ import annotations

import contextlib
from typing import Any

from finetune.train.seams.transformers import loss_is_scaled_for_ga, prepare_inputs
from finetune.train.seams.trl import OFFLOAD_WRAPPERS
PLAIN_OPTIMIZERS_ONLY = ("lomo", "adalomo")  # LOMO optimizers step inside backward with the learning rate


def has_plain_training_step(trainer: Any) -> bool:
    """Whether this trainer's `training_step` is Trainer's own, at most wrapped in activation offloading,
    and none of the features that change it (DeepSpeed, context parallelism, LOMO) is on."""
    from transformers import Trainer

    step = type(trainer).training_step
    if step is not Trainer.training_step and step.__qualname__ not in OFFLOAD_WRAPPERS:
        return False
    if trainer.accelerator.distributed_type == "DEEPSPEED" or str(trainer.args.optim).lower().endswith(PLAIN_OPTIMIZERS_ONLY):
        return False
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    return not (parallelism is not None and getattr(parallelism, "cp_enabled", False))


class MicroStep:
    """Forward and backward of one micro-batch for `trainer`, on `model` (the wrapped model in a gang)."""

    def __init__(self, trainer: Any, model: Any) -> None:
        self.trainer, self.model = trainer, model
        self.fast = has_plain_training_step(trainer)
        self.loss_scaled_for_accumulation: bool | None = loss_is_scaled_for_ga(trainer)

    def enter_training(self) -> None:
        """What `training_step` does first on every call: here once, before a chunk's micro-batches."""
        self.model.train()
        optimizer = self.trainer.optimizer
        if hasattr(optimizer, "train") and callable(optimizer.train):
            optimizer.train()  # schedule-free optimizers

    def __call__(self, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
        if not self.fast:
            return self.trainer.training_step(self.model, inputs, num_items_in_batch)
        trainer = self.trainer
        with getattr(trainer, "maybe_activation_offload_context", None) or contextlib.nullcontext():
            inputs = prepare_inputs(trainer, inputs)
            with trainer.compute_loss_context_manager():
                loss = trainer.compute_loss(self.model, inputs, num_items_in_batch=num_items_in_batch)
            del inputs
            self._maybe_empty_cache()
            if trainer.args.n_gpu > 1:
                loss = loss.mean()
            if not self._scaled(num_items_in_batch):
                loss = loss / trainer.current_gradient_accumulation_steps
            trainer.accelerator.backward(loss)
        return loss.detach()

    def _scaled(self, num_items_in_batch: Any) -> bool:
        """Whether compute_loss already divided by the step's item count (as Trainer decides it)."""
        if self.loss_scaled_for_accumulation is not None:
            return self.loss_scaled_for_accumulation
        trainer = self.trainer
        return (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or trainer.compute_loss_func is not None

    def _maybe_empty_cache(self) -> None:
        steps = self.trainer.args.torch_empty_cache_steps
        if steps is not None and self.trainer.state.global_step % steps == 0:
            from accelerate.utils import clear_device_cache

            clear_device_cache()

