"""Workers as Ray actors: the same worker loop and messages as the local processes, on a cluster.

One actor per device slot: GPUs are Ray resources (`runs_per_device: k` slots on a GPU each ask for
1/k of it; with `auto` each asks 1/MAX_AUTO_SLOTS, so the slots added after the first chunk fit
beside the first), and Ray sets each actor's visible GPU, so inside the actor it is cuda:0. Ray
fills one GPU with fractional actors before it uses the next: on nodes of several GPUs give
`runs_per_device` as a number, which spreads the actors evenly.
Tasks and results travel through Ray queues instead of multiprocessing queues; the controller,
the policy and the state store do not change. The experiment directory must be on storage that
every node sees at the same path (NFS, a shared PersistentVolume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.schedule.messages import WorkerResources
from finetune.schedule.policy import MAX_AUTO_SLOTS
from finetune.schedule.pool import SlotPool, WorkerHandle, WorkerSettings, initial_slots

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # a local runtime carries small messages only


@dataclass
class ActorProcess:
    """What the controller asks of a worker process, for an actor: is it alive, how did it end."""

    actor: Any
    serving: Any  # the ObjectRef of the actor's serve loop

    def is_alive(self) -> bool:
        import ray

        ready, _ = ray.wait([self.serving], timeout=0)
        return not ready

    @property
    def exitcode(self) -> str:
        import ray

        try:
            ray.get(self.serving, timeout=0)
        except Exception as error:  # the actor's death, as Ray reports it
            return type(error).__name__
        return "0"

    def kill(self) -> None:
        import ray

        ray.kill(self.actor)


def _worker_actor_class() -> Any:
    import ray

    @ray.remote
    class WorkerActor:
        def serve(self, worker_id: str, device: str, root: str, resources: WorkerResources, tasks: Any, results: Any) -> None:
            from finetune.schedule.worker import worker_main

            worker_main(worker_id, device, root, resources, tasks, results)

    return WorkerActor


def actor_resources(device: str, slots_setting: int | str) -> dict[str, float]:
    """What one slot's actor asks of Ray: a CPU, and its share of a GPU."""
    if device == "cpu":
        return {"num_cpus": 1, "num_gpus": 0}
    share = MAX_AUTO_SLOTS if slots_setting == "auto" else int(slots_setting)
    return {"num_cpus": 1, "num_gpus": 1 / share}


def cluster_devices(setting: Any) -> list[str]:
    """The devices to put slots on: the cluster's GPUs (as many as it has, or those listed), else the CPU."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if setting == "cpu" or gpus == 0:
        return ["cpu"]
    count = gpus if setting == "auto" else len(setting)
    return [f"gpu{index}" for index in range(count)]


class RayWorkerPool(SlotPool):
    """Workers as Ray actors, one per device slot."""

    def __init__(self, device_setting: Any, slots: int | str, root: Path, address: str | None, memory: WorkerSettings | None = None) -> None:
        import ray
        from ray.util.queue import Queue

        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        self.root, self.slots_setting, self.memory = root, slots, memory or WorkerSettings()
        self.owns_runtime = not address
        self.actor_class = _worker_actor_class()
        self.results = Queue()
        self.devices = cluster_devices(device_setting)
        self.grown: set[str] = set()
        self.workers: list[WorkerHandle] = []
        for device in self.devices:
            for slot in range(initial_slots(slots)):
                self.workers.append(self.spawn(device, slot))

    def spawn(self, device: str, slot: int, replacing: str | None = None) -> WorkerHandle:
        from ray.util.queue import Queue

        worker_id = replacing or f"ray-{device}/{slot}"
        actor = self.actor_class.options(**actor_resources(device, self.slots_setting)).remote()
        tasks = Queue()
        inner_device = "cpu" if device == "cpu" else "cuda:0"  # Ray makes the actor's GPU its only visible one
        sharing = initial_slots(self.slots_setting)  # the workers on a node: as many as its devices' slots
        resources = self.memory.for_worker(sharing, host_share=sharing)
        serving = actor.serve.remote(worker_id, inner_device, str(self.root), resources, tasks, self.results)
        return WorkerHandle(worker_id, device, ActorProcess(actor, serving), tasks, slot=slot)

    def stop(self) -> None:
        import ray

        for worker in self.workers:
            if worker.process.is_alive():
                worker.tasks.put(None)
        ray.wait([worker.process.serving for worker in self.workers], num_returns=len(self.workers), timeout=60)
        for worker in self.workers:
            worker.process.kill()
        if self.owns_runtime:
            ray.shutdown()

