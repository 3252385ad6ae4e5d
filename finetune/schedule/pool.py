"""Worker processes: one per device slot, `experiment.runs_per_device` slots on each GPU.

Several workers on one GPU train several runs at once: a LoRA step of a small model leaves most
of an H100 idle, and separate processes fill it without sharing a Python interpreter. With
`runs_per_device: auto` each GPU starts with one slot and grows to what the memory footprint
of the first chunk allows (`policy.slots_for`). Runs on several devices train on gangs
(`schedule.gang`), started on first need.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from finetune.schedule.gang import GangProcess, GangQueue, free_port, gang_layouts, parse_kind, units_of


def resolve_devices(setting: Any) -> list[str]:
    if setting == "cpu":
        return ["cpu"]
    import torch

    if setting == "auto":
        count = torch.cuda.device_count()
        return [f"cuda:{index}" for index in range(count)] or ["cpu"]
    return [f"cuda:{index}" for index in setting]


def initial_slots(setting: int | str, device: str) -> int:
    if device == "cpu" or setting == "auto":
        return 1
    return int(setting)


@dataclass
class WorkerHandle:
    worker_id: str
    device: str  # a gang's: its devices joined by "+"
    process: Any
    tasks: Any
    busy_with: str | None = None
    resident_keys: set[str] = field(default_factory=set)
    gang: str = ""  # the kind of gang ("ddp:2"), "" for a one-device worker
    layout: tuple[str, ...] = ()  # a gang's device per rank

    @property
    def units(self) -> tuple[str, ...]:
        """The devices it holds while it trains."""
        return units_of(self.layout) if self.gang else (self.device,)


@dataclass
class MemorySettings:
    """The configured state budgets (None: the defaults) and how many workers share the machine."""

    gpu_gb: float | None = None
    cpu_gb: float | None = None
    workers_on_host: int = 1

    def for_worker(self, gpu_share: int) -> dict[str, Any]:
        return {"gpu_gb": self.gpu_gb, "cpu_gb": self.cpu_gb, "gpu_share": gpu_share, "host_share": self.workers_on_host}


class SlotPool:
    """Workers by device slot, whatever runs them: what the controller asks of a pool."""

    slots_setting: int | str
    workers: list[WorkerHandle]
    grown: set[str]

    def spawn(self, device: str, replacing: str | None = None) -> WorkerHandle:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def slots_on(self, device: str) -> int:
        return sum(worker.device == device for worker in self.workers)

    def grow(self, device: str, slots: int) -> list[WorkerHandle]:
        """Add workers on `device` up to `slots` (once per device, for `runs_per_device: auto`)."""
        if self.slots_setting != "auto" or device in self.grown or device == "cpu":
            return []
        self.grown.add(device)
        added = [self.spawn(device) for _ in range(slots - self.slots_on(device))]
        self.workers.extend(added)
        return added

    def worker(self, worker_id: str) -> WorkerHandle:
        return next(worker for worker in self.workers if worker.worker_id == worker_id)

    def respawn(self, worker: WorkerHandle) -> WorkerHandle:
        """A new worker in a dead one's place, with its name."""
        return self.spawn(worker.device, replacing=worker.worker_id)

    def ensure_workers(self, kind: str) -> list[WorkerHandle]:
        """Workers for runs of `kind` ("" one device, "ddp:2" a gang), started on first need; the new ones.
        This pool always has one-device workers and no gangs."""
        if kind:
            raise RuntimeError(f"runs of kind {kind} need gang workers, which this backend does not start")
        return []


class WorkerPool(SlotPool):
    """Worker processes, started early so that their imports overlap the controller's set-up."""

    def __init__(self, devices: list[str], slots: int | str, root: Path, memory: MemorySettings | None = None,
                 kinds: Iterable[str] = ("",)) -> None:
        self.root = root
        self.slots_setting = slots
        self.memory = memory or MemorySettings()
        self.context = multiprocessing.get_context("spawn")
        self.results = self.context.Queue()
        self.devices = devices
        self.workers = []
        self.grown = set()
        self.memory.workers_on_host = sum(initial_slots(slots, device) for device in devices)
        for kind in dict.fromkeys(kinds):
            self.ensure_workers(kind)

    def spawn(self, device: str, replacing: str | None = None) -> WorkerHandle:
        worker_id = replacing or f"{device}/{self.slots_on(device)}"
        memory = self.memory.for_worker(max(1, self.slots_on(device) + (0 if replacing else 1)))
        tasks = self.context.Queue()
        return WorkerHandle(worker_id, device, self._start(worker_id, device, memory, tasks), tasks)

    def _start(self, worker_id: str, device: str, memory: dict[str, Any], tasks: Any, gang: dict[str, Any] | None = None) -> Any:
        from finetune.schedule.worker import worker_main

        process = self.context.Process(
            target=worker_main, args=(worker_id, device, str(self.root), memory, tasks, self.results, gang, True), daemon=True
        )
        process.start()
        return process

    def ensure_workers(self, kind: str) -> list[WorkerHandle]:
        """One-device workers (`runs_per_device` on each device), or the gangs of `kind`: as many as
        the devices hold (preflight has checked that one fits). An experiment whose runs all span
        several devices starts no idle one-device workers."""
        if any(worker.gang == kind for worker in self.workers):
            return []
        if kind:
            added = [self.spawn_gang(kind, layout) for layout in gang_layouts(self.devices, parse_kind(kind)[1])]
            self.workers.extend(added)
            return added
        added = []
        for device in self.devices:
            for _ in range(initial_slots(self.slots_setting, device)):
                worker = self.spawn(device)
                self.workers.append(worker)  # counted by slots_on: the next one on the device gets the next name
                added.append(worker)
        return added

    def spawn_gang(self, kind: str, layout: tuple[str, ...], replacing: str | None = None) -> WorkerHandle:
        width = parse_kind(kind)[1]
        worker_id = replacing or f"{kind}@{'+'.join(units_of(layout))}/{sum(w.gang == kind for w in self.workers)}"
        address = f"tcp://127.0.0.1:{free_port()}"
        queues, processes = [], []
        for rank in range(width):
            rank_info = {"rank": rank, "world": width, "address": address, "devices": list(layout)}
            queues.append(self.context.Queue())
            processes.append(self._start(worker_id, layout[rank], self.memory.for_worker(1), queues[-1], rank_info))
        return WorkerHandle(worker_id, "+".join(units_of(layout)), GangProcess(processes), GangQueue(queues), gang=kind, layout=layout)

    def respawn(self, worker: WorkerHandle) -> WorkerHandle:
        if worker.gang:
            worker.process.terminate()  # ranks left waiting on a dead peer
            return self.spawn_gang(worker.gang, worker.layout, replacing=worker.worker_id)
        return super().respawn(worker)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.tasks.put(None)
            elif worker.gang:
                worker.process.terminate()
        for worker in self.workers:
            worker.process.join(timeout=60)
            if worker.process.is_alive():
                worker.process.terminate()
