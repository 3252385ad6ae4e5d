"""The scheduling policy: plain Python, no torch, testable alone.

Which (run, chunk) a free worker takes next, and how many runs a GPU trains at once. Whether a run
continues after a chunk is the search's answer (`finetune.search`).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_AUTO_SLOTS = 8  # `runs_per_device: auto` never starts more workers on one GPU


@dataclass(frozen=True)
class RunView:
    """What the policy knows of a run."""

    run_id: str
    position: int
    chunks_done: int  # trained, durable or not
    total_chunks: int
    runnable: bool = True
    base_key: str = ""
    group: int = 0
    home: str | None = None  # the worker holding its state in memory
    durable: bool = True  # every trained chunk is on disk, so another worker can take it up
    gang: str = ""  # the kind of worker it needs: "" (one device) or "<strategy>:<devices>"


@dataclass(frozen=True)
class Task:
    run_id: str
    chunk: int


@dataclass(frozen=True)
class WorkerView:
    """What the policy knows of a worker: the slots it holds while it trains, and the kind of run it
    trains ("" for one device; "ddp:2" for a gang of two processes training one run with DDP).

    A device with k slots (`experiment.runs_per_device`) is k units, named `slot_unit(device, i)`: a
    one-device worker holds its own slot, so k of them train k runs on the device at once; a gang
    holds every slot of each of its devices, so it trains only when they are all free."""

    worker_id: str
    units: tuple[str, ...]
    gang: str = ""
    busy: bool = False
    resident_keys: frozenset[str] = frozenset()


def slot_unit(device: str, slot: int) -> str:
    """The policy's unit: slot `slot` of `device`."""
    return f"{device}#{slot}"


def assign(runs: list[RunView], workers: list[WorkerView], busy_runs: set[str]) -> list[tuple[str, Task]]:
    """Tasks for free workers, as (worker_id, task): gang scheduling over slots.

    Runs are taken fairest first (fewest chunks done; among equals one a free worker holds in memory,
    then one whose base model a free worker has loaded, then plan order). A run goes to a free worker of
    its kind whose slots no busy worker holds; among those, the worker that holds the run in memory,
    then one with its base model loaded. A gang run that cannot start reserves the slots of the gang
    worker nearest to free, so that runs behind it in the order do not take them as they free up:
    a run on many devices waits for at most one turn of the runs ahead of it, never for ever.
    """
    held = {unit for worker in workers if worker.busy for unit in worker.units}
    reserved: set[str] = set()
    free = [worker for worker in workers if not worker.busy]
    homes = {worker.worker_id for worker in free}
    loaded = {key for worker in free for key in worker.resident_keys}
    order = sorted(
        (run for run in runs if run.runnable and run.run_id not in busy_runs and run.chunks_done < run.total_chunks),
        key=lambda run: (run.chunks_done, run.home not in homes, run.base_key not in loaded, run.position),
    )
    assignments: list[tuple[str, Task]] = []
    for run in order:
        fitting = [worker for worker in free if worker.gang == run.gang and (run.home in (None, worker.worker_id) or run.durable)]
        usable = [worker for worker in fitting if not set(worker.units) & (held | reserved)]
        if usable:
            chosen = min(usable, key=lambda worker: (run.home != worker.worker_id, run.base_key not in worker.resident_keys))
            assignments.append((chosen.worker_id, Task(run.run_id, run.chunks_done)))
            held.update(chosen.units)
            free.remove(chosen)
        elif run.gang and fitting:
            nearest = min(fitting, key=lambda worker: len(set(worker.units) & held))
            reserved.update(nearest.units)
    return assignments


def slots_for(total_bytes: int, footprint_bytes: int, runnable: int, headroom: float = 0.9, most: int = MAX_AUTO_SLOTS) -> int:
    """How many runs one GPU trains at once (`runs_per_device: auto`): as many as fit by the
    footprint measured on the first chunk, at most one per runnable run and `most`."""
    if total_bytes <= 0 or footprint_bytes <= 0:
        return 1
    return max(1, min(most, runnable, int(total_bytes * headroom // footprint_bytes)))
