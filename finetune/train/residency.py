"""Where a worker keeps runs' state between chunks: on the GPU while it fits, then in pinned CPU
memory, then only on disk (its last durable checkpoint).

The decision is plain arithmetic over sizes, testable alone; `Workbench` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Resident:
    """A run's own state on a worker (adapter or weights, optimizer moments), in bytes per tier."""

    run_id: str
    gpu_bytes: int
    cpu_bytes: int


@dataclass(frozen=True)
class Budgets:
    gpu_bytes: int
    cpu_bytes: int


def plan_placement(residents: list[Resident], active: str, budgets: Budgets) -> tuple[list[str], list[str]]:
    """(runs to move to CPU memory, runs to drop to disk), least recently used first.

    `residents` is in least-recently-used order. The active run is about to train on the GPU, so
    its whole state counts there and it is never moved.
    """
    gpu = {r.run_id: r.gpu_bytes for r in residents}
    cpu = {r.run_id: r.cpu_bytes for r in residents}
    if active in gpu:
        gpu[active] += cpu[active]
        cpu[active] = 0
    offload: list[str] = []
    for resident in residents:
        if sum(gpu.values()) <= budgets.gpu_bytes:
            break
        if resident.run_id != active and gpu[resident.run_id] > 0:
            offload.append(resident.run_id)
            cpu[resident.run_id] += gpu[resident.run_id]
            gpu[resident.run_id] = 0
    drop: list[str] = []
    for resident in residents:
        if sum(cpu.values()) <= budgets.cpu_bytes:
            break
        if resident.run_id != active and cpu[resident.run_id] > 0:
            drop.append(resident.run_id)
            cpu[resident.run_id] = 0
    return [run_id for run_id in offload if run_id not in drop], drop


def default_budgets(device: str, gpu_share: int, host_share: int, gpu_gb: float | None, cpu_gb: float | None) -> Budgets:
    """A worker's budgets: the config's, else a quarter of the GPU divided among the workers on it,
    and half the free host memory divided among the workers on the machine."""
    import psutil

    if gpu_gb is not None:
        gpu = int(gpu_gb * GIB)
    elif device.startswith("cuda"):
        import torch

        gpu = int(torch.cuda.get_device_properties(device).total_memory * 0.25 / max(1, gpu_share))
    else:
        gpu = 0
    cpu = int(cpu_gb * GIB) if cpu_gb is not None else int(psutil.virtual_memory().available * 0.5 / max(1, host_share))
    return Budgets(gpu, cpu)
