"""A process's place in a gang: the k processes that train one run together (data parallel).

Each rank of a gang is a worker process. It joins the gang's process group before any trainer is
built, so accelerate (inside TRL's trainers) finds the group and wraps models with DDP (or FSDP,
or DeepSpeed) over it: gloo on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# A rank whose peer died stops waiting after this long even if no one kills it (the controller
# normally ends the whole gang at once).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class GangRank:
    rank: int
    world: int
    address: str  # tcp://host:port of rank 0's rendezvous
    devices: tuple[str, ...]  # the gang's devices ("cpu" repeated on the CPU), by rank

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> GangRank:
        return cls(value["rank"], value["world"], value["address"], tuple(value["devices"]))


def visible_device(device: str) -> str:
    """Make `device` (cuda:N) the only GPU this process sees, before CUDA starts; its new name.

    Without this a worker sees every GPU, and HF's Trainer wraps a model on several of them in
    DataParallel; a worker trains on its own GPU only.
    """
    if not device.startswith("cuda"):
        return device
    _see_only([device])
    return "cuda:0"


def _see_only(devices: list[str] | tuple[str, ...]) -> None:
    """Restrict this process to `devices`, ordinals as the parent saw them (through its own
    CUDA_VISIBLE_DEVICES, if it had one)."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = inherited.split(",") if inherited else None
    ordinals = [int(device.partition(":")[2] or 0) for device in devices]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] if names else str(i) for i in ordinals)


def join_gang(gang: GangRank, isolate: bool = True) -> str:
    """Join the gang's process group; returns this rank's device."""
    import torch.distributed

    host, _, port = gang.address.removeprefix("tcp://").rpartition(":")
    os.environ.update(
        RANK=str(gang.rank), WORLD_SIZE=str(gang.world), LOCAL_RANK=str(gang.rank),
        LOCAL_WORLD_SIZE=str(gang.world), MASTER_ADDR=host, MASTER_PORT=port,
    )
    if gang.devices[gang.rank] == "cpu":
        device, backend = "cpu", "gloo"
    else:
        if isolate:  # the gang's GPUs only; rank r trains on the r-th
            _see_only(gang.devices)
        device, backend = f"cuda:{gang.rank}", "nccl"
        os.environ["ACCELERATE_TORCH_DEVICE"] = device
        import torch

        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        backend, init_method=gang.address, rank=gang.rank, world_size=gang.world, timeout=COLLECTIVE_TIMEOUT
    )
    return device


def in_gang() -> bool:
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_to_first(value: Any) -> list[Any] | None:
    """Every rank's `value` on rank 0 (None on the others); [value] outside a gang."""
    if not in_gang():
        return [value]
    import torch.distributed

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    values: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(value, values, dst=0)
    return values
