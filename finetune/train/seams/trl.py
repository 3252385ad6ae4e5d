"""TRL's private APIs used by finetune (bounded in pyproject.toml: trl>=1.0,<2).

`tests/test_seams.py` checks each against the installed TRL.
"""

from __future__ import annotations

from typing import Any

# `training_step` overrides that only wrap `Trainer.training_step` in the activation-offload context, so
# `micro_step.MicroStep` may replay `Trainer.training_step` for them (an implementation detail of TRL:
# any other override, GRPO's generation for one, keeps its own training_step).
OFFLOAD_WRAPPERS = frozenset({"SFTTrainer.training_step", "DPOTrainer.training_step"})


def generation_counter(trainer: Any) -> int:
    """`GRPOTrainer._step`: the micro-batches trained since it began, which decides when GRPO generates a
    new buffer of completions (every `steps_per_generation`) and which slice of the buffer a micro-batch
    trains. A run continued from a checkpoint must continue this count; TRL has no public accessor.
    0 for trainers without one."""
    return int(getattr(trainer, "_step", 0))


def set_generation_counter(trainer: Any, value: int) -> None:
    """Continue GRPO's generation counter at `value` (see `generation_counter`)."""
    if hasattr(trainer, "_step"):
        trainer._step = int(value)
