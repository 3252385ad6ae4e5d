"""Which runs train fused (`experiment.fuse`): plain Python, no torch, testable alone.

After the policy has given free workers their tasks (`policy.assign`), each task of a run that can
fuse takes riders: other runs waiting for a worker whose fuse key is the same (one base model and
precision, SFT, plain LoRA, one device), fairest first, up to the group's limit. The worker trains
the group's chunks together (`train.fused`); every member still has its own chunk, ticket,
checkpoint and decisions, so stop, clone, delete and the search work per member as before. A run
that stops leaves its group at the chunk boundary; a new run (a clone, a search's proposal) joins
one at the next dispatch.

Whether the loaded adapters can really fuse is checked again by the worker (`fused.fuse_problems`:
a chat template that adds tokens gives each adapter token rows of its own, which do not fuse); when
they cannot, it trains the members one after another, as without fusing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AUTO_ROWS = 64  # `fuse: auto`: a fused micro-batch holds at most this many rows (members' micro-batches together)
AUTO_MOST = 16


@dataclass(frozen=True)
class FuseView:
    """What fusing knows of a run waiting for a worker."""

    run_id: str
    fuse_key: str  # "" : it never fuses
    rows: int  # its micro-batch size
    chunks_done: int
    position: int
    home: str | None = None
    durable: bool = True


def waiting_views(records: Any) -> list[FuseView]:
    """The runs (`records.RunRecord`s) that could train now, as fusing sees them."""
    return [FuseView(r.run_id, r.fuse_key, r.planned.derived.per_device_train_batch_size or 1, r.trained_chunks, r.position,
                     r.home, r.trained_chunks == r.durable_chunks)
            for r in records if r.unfinished and r.active and not r.gang]


def fuse_key(config: Any, base_key: str, gang: str) -> str:
    """Runs with one non-empty key may train in one fused group; "" when the run's config rules it out."""
    setting = config.experiment.fuse
    peft = config.peft_conf
    if setting == "off" or gang or config.method != "sft" or peft.peft_type != "LORA":
        return ""
    kwargs = peft.peft_kwargs.model_dump(exclude_unset=True)
    if any(kwargs.get(key) for key in ("use_dora", "modules_to_save", "trainable_token_indices", "lora_bias")):
        return ""
    args = config.training_args
    if getattr(args, "fp16", False) or getattr(args, "loss_type", "nll") not in (None, "nll"):
        return ""
    if getattr(args, "label_smoothing_factor", 0) or getattr(args, "activation_offloading", False):
        return ""
    return f"sft|{base_key}"


def group_limit(setting: Any) -> tuple[int, int]:
    """(most runs, most rows) of a group for `experiment.fuse`."""
    if setting == "off":
        return 1, 0
    if setting == "auto":
        return AUTO_MOST, AUTO_ROWS
    return int(setting), 0


def fuse_groups(assignments: list[tuple[str, Any]], waiting: list[FuseView], busy: set[str], setting: Any,
                make_task: Any) -> list[tuple[str, list[Any]]]:
    """Each assignment (worker_id, task) with its riders: [(worker_id, [task, rider tasks...])].

    `waiting`: runs that could train now; `busy`: runs in flight; `make_task(view)`: a rider's task
    (its next chunk). A rider is a waiting run, not busy and not assigned, with the leader's fuse key,
    whose state that worker may take up (its home is that worker, or none, or its chunks are durable);
    fewest chunks done first, then plan order. The group stops at the setting's runs (and rows, for auto).
    """
    most, rows_budget = group_limit(setting)
    if most == 1:
        return [(worker_id, [task]) for worker_id, task in assignments]
    views = {view.run_id: view for view in waiting}
    taken = set(busy) | {task.run_id for _, task in assignments}
    order = sorted(waiting, key=lambda view: (view.chunks_done, view.position))
    groups = []
    for worker_id, task in assignments:
        group, leader = [task], views.get(task.run_id)
        if leader is not None and leader.fuse_key and most > 1:
            rows = leader.rows
            for view in order:
                if len(group) >= most:
                    break
                if view.run_id in taken or view.fuse_key != leader.fuse_key:
                    continue
                if view.home not in (None, worker_id) and not view.durable:
                    continue
                if rows_budget and rows + view.rows > rows_budget:
                    continue
                group.append(make_task(view))
                taken.add(view.run_id)
                rows += view.rows
        groups.append((worker_id, group))
    return groups
