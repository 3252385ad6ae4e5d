"""Worker processes: one per device slot, `experiment.runs_per_device` slots on each device.

Several workers on one GPU train several runs at once: a LoRA step of a small model leaves most
of an H100 idle, and separate processes fill it without sharing a Python interpreter. With
`runs_per_device: auto` each GPU starts with one slot and grows to what the memory footprint
of the first chunk allows (`policy.slots_for`); on the CPU `auto` is one slot, and an explicit k
starts k workers that split the cores between them. Runs on several devices train on gangs
(`schedule.gang`), started on first need.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from finetune.schedule.gang import GangProcess, GangQueue, free_port, gang_layouts, parse_kind, units_of
from finetune.schedule.messages import WorkerResources
from finetune.schedule.policy import slot_unit


def resolve_devices(setting: Any) -> list[str]:
    if setting == "cpu":
        return ["cpu"]
    import torch

    if setting == "auto":
        count = torch.cuda.device_count()
        return [f"cuda:{index}" for index in range(count)] or ["cpu"]
    return [f"cuda:{index}" for index in setting]


def initial_slots(setting: int | str) -> int:
    """Workers a device starts with: `runs_per_device`, or one for `auto` (which grows on GPUs)."""
    return 1 if setting == "auto" else int(setting)


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class WorkerHandle:
    worker_id: str
    device: str  # a gang's: its devices joined by "+"
    process: Any
    tasks: Any
    slot: int = 0  # a one-device worker's slot on its device
    busy_with: str | None = None
    resident_keys: set[str] = field(default_factory=set)  # base models it has loaded, as it last reported
    gang: str = ""  # the kind of gang ("ddp:2"), "" for a one-device worker
    layout: tuple[str, ...] = ()  # a gang's device per rank
    rank_error: str | None = None  # why a rank of the gang stopped, as it reported
    incarnation: int = 0  # which process of this name: a respawned worker gets a new one
    ticket: int = -1  # the dispatch ticket of the task it trains (busy_with)
    riders: dict[str, int] = field(default_factory=dict)  # the other runs of its fused group, with their tickets

    def task_of(self, run_id: str | None) -> tuple[int, str | None]:
        """(ticket, run) of the task it trains for `run_id`: a rider of its fused group, else its leader."""
        if run_id in self.riders:
            return self.riders[run_id], run_id
        return self.ticket, self.busy_with


@dataclass
class WorkerSettings:
    """The experiment's settings for its workers: state budgets (None: the defaults), torch threads
    per worker (None: the machine's cores shared evenly), and how many worker processes share the
    machine."""

    gpu_gb: float | None = None
    cpu_gb: float | None = None
    threads: int | None = None
    workers_on_host: int = 1

    def for_worker(self, gpu_share: int, host_share: int | None = None) -> WorkerResources:
        return WorkerResources(self.gpu_gb, self.cpu_gb, gpu_share, max(1, host_share or self.workers_on_host), self.threads)


class SlotPool:
    """Workers by device slot, whatever runs them: what the controller asks of a pool."""

    slots_setting: int | str
    workers: list[WorkerHandle]
    grown: set[str]
    memory: WorkerSettings

    def spawn(self, device: str, slot: int, replacing: str | None = None) -> WorkerHandle:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def local_devices(self) -> list[str] | None:
        """The devices of this machine that the workers use; None where workers run elsewhere (Ray)."""
        return None

    def slots_on(self, device: str) -> int:
        return sum(worker.device == device for worker in self.workers)

    def units(self, worker: WorkerHandle) -> tuple[str, ...]:
        """The slots `worker` holds while it trains: its own, or for a gang every slot of its devices."""
        if not worker.gang:
            return (slot_unit(worker.device, worker.slot),)
        return tuple(slot_unit(device, slot) for device in units_of(worker.layout) for slot in range(max(1, self.slots_on(device))))

    def grow(self, device: str, slots: int) -> list[WorkerHandle]:
        """Add workers on `device` up to `slots` (once per device, for `runs_per_device: auto`)."""
        if self.slots_setting != "auto" or device in self.grown or device == "cpu":
            return []
        self.grown.add(device)
        added: list[WorkerHandle] = []
        self.memory.workers_on_host += max(0, slots - self.slots_on(device))
        for _ in range(slots - self.slots_on(device)):
            added.append(self.spawn(device, self.slots_on(device)))
            self.workers.append(added[-1])  # counted by slots_on: the next one gets the next slot
        return added

    def worker(self, worker_id: str) -> WorkerHandle:
        return next(worker for worker in self.workers if worker.worker_id == worker_id)

    def respawn(self, worker: WorkerHandle) -> WorkerHandle:
        """A new worker in a dead one's place, with its name and slot."""
        return self.spawn(worker.device, worker.slot, replacing=worker.worker_id)

    def abandon(self) -> None:
        """Stop every worker now, chunks in training or not (an interrupt whose grace time is over)."""
        self.stop()

    def ensure_workers(self, kind: str) -> list[WorkerHandle]:
        """Workers for runs of `kind` ("" one device, "ddp:2" a gang), started on first need; the new ones.
        This pool always has one-device workers and no gangs."""
        if kind:
            raise RuntimeError(f"runs of kind {kind} need gang workers, which this backend does not start")
        return []


class WorkerPool(SlotPool):
    """Worker processes, started early so that their imports overlap the controller's set-up."""

    def __init__(self, devices: list[str], slots: int | str, root: Path, memory: WorkerSettings | None = None,
                 kinds: Iterable[str] = ("",)) -> None:
        self.root = root
        self.slots_setting = slots
        self.memory = memory or WorkerSettings()
        self.context = multiprocessing.get_context("spawn")
        self.results = self.context.Queue()
        self.devices = devices
        self.workers = []
        self.grown = set()
        kinds = list(dict.fromkeys(kinds))
        self.memory.workers_on_host = sum(self._processes_of(kind) for kind in kinds)
        for kind in kinds:
            self.ensure_workers(kind)

    def _processes_of(self, kind: str) -> int:
        """The worker processes `ensure_workers(kind)` starts: a slot each, or a rank each."""
        if not kind:
            return len(self.devices) * initial_slots(self.slots_setting)
        width = parse_kind(kind)[1]
        return width * len(gang_layouts(self.devices, width))

    def local_devices(self) -> list[str] | None:
        return self.devices

    def spawn(self, device: str, slot: int, replacing: str | None = None) -> WorkerHandle:
        worker_id = replacing or f"{device}/{slot}"
        memory = self.memory.for_worker(max(1, self.slots_on(device) + (0 if replacing else 1)))
        tasks = self.context.Queue()
        incarnation = self._next_incarnation()
        return WorkerHandle(worker_id, device, self._start(worker_id, device, memory, tasks, incarnation=incarnation), tasks,
                            slot=slot, incarnation=incarnation)

    def _next_incarnation(self) -> int:
        self.incarnations = getattr(self, "incarnations", 0) + 1
        return self.incarnations

    def _start(self, worker_id: str, device: str, memory: WorkerResources, tasks: Any, gang: dict[str, Any] | None = None,
               incarnation: int = 0) -> Any:
        from finetune.schedule.worker import worker_main

        from finetune.schedule.interrupts import sigint_ignored

        process = self.context.Process(
            target=worker_main,
            args=(worker_id, device, str(self.root), memory, tasks, self.results, gang, True, os.getpid(), incarnation),
            daemon=True,
        )
        with sigint_ignored():  # a Ctrl-C is the controller's to handle; it stops the workers
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
            for slot in range(initial_slots(self.slots_setting)):
                added.append(self.spawn(device, slot))
                self.workers.append(added[-1])
        return added

    def spawn_gang(self, kind: str, layout: tuple[str, ...], replacing: str | None = None) -> WorkerHandle:
        width = parse_kind(kind)[1]
        worker_id = replacing or f"{kind}@{'+'.join(units_of(layout))}/{sum(w.gang == kind for w in self.workers)}"
        address = f"tcp://127.0.0.1:{free_port()}"
        queues, processes = [], []
        incarnation = self._next_incarnation()
        for rank in range(width):
            rank_info = {"rank": rank, "world": width, "address": address, "devices": list(layout)}
            queues.append(self.context.Queue())
            processes.append(self._start(worker_id, layout[rank], self.memory.for_worker(1), queues[-1], rank_info, incarnation))
        return WorkerHandle(worker_id, "+".join(units_of(layout)), GangProcess(processes), GangQueue(queues), gang=kind, layout=layout,
                            incarnation=incarnation)

    def respawn(self, worker: WorkerHandle) -> WorkerHandle:
        if worker.gang:
            worker.process.terminate()  # ranks left waiting on a dead peer
            return self.spawn_gang(worker.gang, worker.layout, replacing=worker.worker_id)
        return super().respawn(worker)

    def abandon(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in self.workers:
            worker.process.join(timeout=10)

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
