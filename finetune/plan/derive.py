"""Derived values of a run: batch-size split, effective learning rate, steps and chunks."""

from __future__ import annotations

import math
from typing import Any

from finetune.plan.model import Derived

DEFAULT_EPOCHS = 3.0


class DeriveError(ValueError):
    """A config whose derived values cannot be computed; the message says what would work."""


def split_batch_size(total: int, max_per_device: int, num_processes: int = 1) -> tuple[int, int]:
    """(per-device batch size, gradient accumulation) for a total batch size, as SiloGen computes it.

    The per-process share is total / processes; accumulation starts at 1 and grows while the
    per-device batch is too large or does not divide the share evenly.
    """
    if total % num_processes:
        below = total - total % num_processes
        options = [value for value in (below, below + num_processes) if value > 0]
        raise DeriveError(
            f"batchsize_conf.total_train_batch_size {total} cannot be split evenly over {num_processes} processes; "
            f"totals that work: {', '.join(map(str, options))}"
        )
    share = total // num_processes
    accumulation = min(divisor for divisor in _divisors(share) if share // divisor <= max_per_device)
    return share // accumulation, accumulation


def _divisors(number: int) -> list[int]:
    """Every divisor of `number`, found in sqrt(number) steps (a counting loop up to a large prime would not end)."""
    small = [value for value in range(1, math.isqrt(number) + 1) if number % value == 0]
    return small + [number // value for value in small]


def effective_learning_rate(learning_rate: float, multiplier: float, scaling: str, total_batch: int) -> float:
    factor = {"none": 1.0, "sqrt": math.sqrt(total_batch), "linear": float(total_batch)}[scaling]
    return learning_rate * multiplier * factor


def chunk_steps(total_steps: int, num_chunks: int) -> list[int]:
    """Cut `total_steps` optimizer steps into at most `num_chunks` chunks of whole steps.

    Every chunk but the last has ceil(total / chunks) steps; only the last can be smaller.
    """
    if total_steps <= 0:
        return []
    size = math.ceil(total_steps / num_chunks)
    full, rest = divmod(total_steps, size)
    return [size] * full + ([rest] if rest else [])


def derive(config: Any, train_examples: int | None) -> Derived:
    """Derived values for a validated config (`finetune.config.models.AnyFinetuneConfig`).

    The batch is split over the run's processes: `experiment.devices_per_run` of them.
    """
    num_processes = config.experiment.devices_per_run
    batch = config.batchsize_conf
    per_device, accumulation = split_batch_size(
        batch.total_train_batch_size, batch.max_per_device_train_batch_size, num_processes
    )
    args = config.training_args
    base_lr = float(args.learning_rate)
    overrides = config.overrides
    epochs = overrides.num_train_epochs if overrides.num_train_epochs is not None else args.num_train_epochs
    epochs = float(epochs if epochs is not None else DEFAULT_EPOCHS)
    steps_per_epoch = total_steps = None
    chunks = None
    max_steps = getattr(args, "max_steps", -1) or -1
    if train_examples is not None:
        batches = math.ceil(train_examples / (per_device * num_processes))
        steps_per_epoch = max(1, math.ceil(batches / accumulation))
        total_steps = math.ceil(steps_per_epoch * epochs)
    if max_steps > 0:
        total_steps = int(max_steps)
    if total_steps is not None:
        chunks = chunk_steps(total_steps, config.experiment.num_chunks)
    return Derived(
        num_processes=num_processes,
        total_train_batch_size=batch.total_train_batch_size,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=batch.per_device_eval_batch_size or per_device,
        base_learning_rate=base_lr,
        learning_rate=effective_learning_rate(
            base_lr, overrides.lr_multiplier, overrides.lr_batch_size_scaling, batch.total_train_batch_size
        ),
        num_train_epochs=epochs,
        train_examples=train_examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        chunk_steps=chunks,
    )
