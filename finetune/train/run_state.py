"""What a run's durable state is, and the device and RNG helpers its session uses around it.

`RunState` is what a durable chunk holds (CPU copies of everything a run needs to continue exactly);
`with_own_hyperparameters` puts a run's configured hyperparameters into a state restored from another
run (a PBT exploit of its donor). Split from `session.py`, which trains with them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from finetune.train.data_order import DataPosition


@dataclass
class RunState:
    """What a durable checkpoint holds: CPU copies of everything a run needs to continue exactly."""

    step: int
    position: DataPosition
    trainable: dict[str, Any]  # the adapter's state dict (PEFT names) or the full model's
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    counters: dict[str, float] = field(default_factory=dict)
    reference: dict[str, Any] | None = None  # the reference model's weights, when `sync_ref_model` moves them


def capture_rng(device: str) -> dict[str, Any]:
    import numpy
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "numpy": numpy.random.get_state(), "cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: str) -> None:
    import numpy
    import torch

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def to_cpu(value: Any) -> Any:
    """A deep copy with every tensor on the CPU (the device keeps training on the originals)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def _moved(tensor: Any, target: str, pin: bool) -> Any:
    import torch

    if tensor.device.type == torch.device(target).type:
        return tensor
    if target != "cpu":
        return tensor.to(target, non_blocking=True)
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
    copy.copy_(tensor, non_blocking=pin)
    return copy


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def with_own_hyperparameters(optimizer: dict[str, Any], scheduler: dict[str, Any],
                             configured: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A restored optimizer and schedule state with this run's configured hyperparameters in place of the ones
    saved: the moments and the schedule's position are kept, the learning rate is scaled by the ratio of the
    configured base rate to the saved one (the states are returned unchanged when they already agree, as for
    a run's own checkpoint)."""
    groups = optimizer.get("param_groups", [])
    base_lrs = list(scheduler.get("base_lrs") or [group.get("initial_lr", group.get("lr")) for group in groups])
    if len(groups) != len(configured) or len(base_lrs) != len(groups):
        return optimizer, scheduler
    new_groups, changed = [], False
    for index, (group, own) in enumerate(zip(groups, configured)):
        group = dict(group)
        own_base, saved_base = own.get("initial_lr", own.get("lr")), base_lrs[index]
        if own_base is not None and saved_base and own_base != saved_base:
            group["lr"] = group["lr"] * own_base / saved_base
            group["initial_lr"] = base_lrs[index] = own_base
            changed = True
        for key, value in own.items():
            if key not in ("lr", "initial_lr") and key in group and group[key] != value:
                group[key], changed = value, True
        new_groups.append(group)
    if not changed:
        return optimizer, scheduler
    new_scheduler = dict(scheduler)
    if "base_lrs" in scheduler:
        new_scheduler["base_lrs"] = base_lrs
    if "_last_lr" in scheduler:  # the rate of the step about to run, as `get_last_lr` reports it
        new_scheduler["_last_lr"] = [group["lr"] for group in new_groups]
    return {**optimizer, "param_groups": new_groups}, new_scheduler
