"""The controller: owns the plan, the policy and the state store; feeds (run, chunk) tasks to workers.

A chunk has two moments. `chunk_done`: the worker trained and evaluated it and is free for the
next task, so the policy decides at once. `chunk_durable`: its checkpoint is on disk, and only
then does the state store record it. Kill the controller at any moment: `finetune run --resume`
continues every run from its last durable chunk.
"""

from __future__ import annotations

import json
import queue
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from finetune.config.validation import CONFIG_ADAPTER
from finetune.io import write_json_atomic
from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.gang import gang_kind
from finetune.schedule.policy import RunView, SuccessiveHalving, WorkerView, assign, slots_for
from finetune.schedule.pool import WorkerHandle, WorkerPool
from finetune.schedule.preparation import initial_checkpoint
from finetune.schedule.store import StateStore

POLL_SECONDS = 0.2
MAX_LOST_CHUNKS = 1  # a chunk whose worker dies again (out of memory, say) fails its run rather than loops


class Tracker(Protocol):
    """What the controller needs of experiment tracking (`finetune.track.mlflow_tracker.Tracker`)."""

    uri: str

    def parent_run(self, known_id: str | None) -> str: ...
    def child_run(self, parent_id: str, run: PlannedRun) -> str: ...
    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifacts(self, run_id: str, directory: str) -> None: ...
    def finish(self, run_id: str, status: str) -> None: ...


@dataclass
class Controller:
    plan: RunPlan
    root: Path
    store: StateStore
    tracker: Tracker
    pool: WorkerPool
    on_change: Callable[[], None] = lambda: None
    sha: dict[int, SuccessiveHalving] = field(default_factory=dict)
    base_keys: dict[str, str] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)
    parent_mlflow_id: str | None = None
    trained: dict[str, int] = field(default_factory=dict)  # chunks trained per run, durable or not
    homes: dict[str, str] = field(default_factory=dict)  # run -> worker holding its state
    done_chunks: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # awaiting durability
    durable_first: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    lost_chunks: dict[tuple[str, int], int] = field(default_factory=dict)  # times each (run, chunk) was lost
    gangs: dict[str, str] = field(default_factory=dict)  # run -> the kind of gang it needs ("" for none)
    rank_errors: dict[str, str] = field(default_factory=dict)  # gang worker -> why a rank of it stopped

    # ------------------------------------------------------------ set-up

    @property
    def workers(self) -> list[WorkerHandle]:
        return self.pool.workers

    def start(self) -> None:
        for row in self.store.runs():
            if row.state == "running":
                self.store.set_state(row.run_id, "pending")
        for run in self.plan.runs:
            self._register(run)
        for run_id, error in self.plan.failed.items():
            if self.store.run(run_id).state != "failed":
                self.store.set_state(run_id, "failed", error)
                self.store.event("run_failed", run_id, error=error, stage="preparing data")
        self._setup_sha()
        self._setup_tracking()

    def _register(self, run: PlannedRun) -> None:
        """Add a run to the store, validating its config once for the whole experiment."""
        from finetune.train.workbench import base_key

        self.store.add_run(run.run_id, run.label, len(run.derived.chunk_steps or []), run.parent_run_id)
        self.configs[run.run_id] = CONFIG_ADAPTER.validate_python(run.config)
        self.base_keys[run.run_id] = base_key(self.configs[run.run_id])
        self.gangs[run.run_id] = gang_kind(self.configs[run.run_id].experiment)
        for added in self.pool.ensure_workers(self.gangs[run.run_id]):
            self.store.event("workers_started", None, worker=added.worker_id, device=added.device, gang=added.gang)
        self.trained[run.run_id] = self.store.run(run.run_id).chunks_done

    def _setup_sha(self) -> None:
        for group, sweep in enumerate(self.plan.sweeps):
            if sweep.get("strategy") == "successive_halving":
                self.sha[group] = SuccessiveHalving(
                    metric=sweep.get("metric", "eval_loss"),
                    direction=sweep.get("direction", "minimize"),
                    min_chunks=sweep.get("min_chunks", 1),
                    max_chunks=sweep.get("max_chunks") or self.plan.num_chunks,
                    reduction_factor=sweep.get("reduction_factor", 2),
                    min_early_stopping_rate=sweep.get("min_early_stopping_rate", 0),
                )
        for chunk in self.store.chunk_rows():  # replay rung results after a restart
            run = self._planned(chunk["run_id"])
            policy = self.sha.get(run.group) if run else None
            if policy is not None:
                done = chunk["chunk"] + 1
                if done in policy.rungs() and policy.metric in chunk["metrics"]:
                    policy.rung_results.setdefault(done, {})[chunk["run_id"]] = chunk["metrics"][policy.metric]

    def _setup_tracking(self) -> None:
        state_file = self.root / "tracking.json"
        known = json.loads(state_file.read_text()) if state_file.is_file() else {}
        self.parent_mlflow_id = self.tracker.parent_run(known.get("parent_run_id"))
        write_json_atomic(state_file, {"parent_run_id": self.parent_mlflow_id, "uri": self.tracker.uri})
        for row in self.store.runs():
            if row.mlflow_run_id is None and (run := self._planned(row.run_id)) is not None:
                self.store.set_mlflow_run(row.run_id, self.tracker.child_run(self.parent_mlflow_id, run))

    def _planned(self, run_id: str) -> PlannedRun | None:
        return next((run for run in self.plan.runs if run.run_id == run_id), None)

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        while True:
            self._apply_requests()
            self._dispatch()
            if not any(worker.busy_with for worker in self.workers) and not self.done_chunks and self._nothing_left():
                break
            self._drain()
            self._check_workers()
        self._finish_tracking()

    def _views(self) -> list[RunView]:
        views = []
        for row in self.store.runs():
            run = self._planned(row.run_id)
            if run is None:
                continue
            runnable = row.state in ("pending", "running")
            trained = self.trained.get(row.run_id, row.chunks_done)
            views.append(RunView(row.run_id, row.position, trained, row.total_chunks, runnable, self.base_keys.get(row.run_id, ""),
                                 run.group, self.homes.get(row.run_id), durable=trained == row.chunks_done,
                                 gang=self.gangs.get(row.run_id, "")))
        return views

    def _nothing_left(self) -> bool:
        return not any(view.runnable and view.chunks_done < view.total_chunks for view in self._views())

    def busy(self, run_id: str) -> bool:
        """Training a chunk, or a trained chunk not yet durable."""
        return any(worker.busy_with == run_id for worker in self.workers) or any(key[0] == run_id for key in self.done_chunks)

    def add_run(self, run: PlannedRun) -> None:
        self.plan = self.plan.model_copy(update={"runs": [*self.plan.runs, run]})
        write_json_atomic(self.root / "plan.json", self.plan.model_dump(mode="json"))
        self._register(run)
        if self.parent_mlflow_id:
            self.store.set_mlflow_run(run.run_id, self.tracker.child_run(self.parent_mlflow_id, run))

    def _dispatch(self) -> None:
        busy = {worker.busy_with for worker in self.workers if worker.busy_with}
        workers = [
            WorkerView(worker.worker_id, worker.units, worker.gang, bool(worker.busy_with) or not worker.process.is_alive(),
                       frozenset(worker.resident_keys))
            for worker in self.workers
        ]
        for worker_id, task in assign(self._views(), workers, busy):
            worker = self.pool.worker(worker_id)
            run = self._planned(task.run_id)
            assert run is not None
            row = self.store.run(task.run_id)
            config = self.configs[task.run_id]
            total = len(run.derived.chunk_steps or [])
            every = config.experiment.eval_every_chunks
            worker.tasks.put(
                {"run": run.model_dump(mode="json"), "chunk": task.chunk,
                 "resume_from": row.last_checkpoint or initial_checkpoint(config),
                 "max_eval_samples": config.experiment.max_eval_samples,
                 "evaluate": (task.chunk + 1) % every == 0 or task.chunk == total - 1}
            )
            worker.busy_with = task.run_id
            worker.resident_keys.add(self.base_keys[task.run_id])
            self.homes[task.run_id] = worker.worker_id
            self.store.set_state(task.run_id, "running")
            self.store.event("chunk_started", task.run_id, chunk=task.chunk, device=worker.device, worker=worker.worker_id)
            self.on_change()

    def _drain(self) -> None:
        try:
            message = self.pool.results.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self.pool.results.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "metrics":
            self.store.log_metrics(message["run_id"], message["step"], message["metrics"])
            mlflow_id = self.store.run(message["run_id"]).mlflow_run_id
            if mlflow_id:
                self.tracker.log_metrics(mlflow_id, message["step"], message["metrics"])
        elif kind == "chunk_done":
            self._chunk_done(message)
        elif kind == "chunk_durable":
            self._chunk_durable(message)
        elif kind in ("failed", "write_failed"):
            self._run_failed(message)
        elif kind == "rank_error":  # the gang ends; `_check_workers` retries or fails its run
            self.rank_errors[message["worker"]] = f"rank {message['rank']}: {message['error']}"
            self.store.event("rank_error", message["run_id"], worker=message["worker"], rank=message["rank"],
                             error=message["error"], traceback=message.get("traceback"))
        self.on_change()

    def _run_failed(self, message: dict[str, Any]) -> None:
        run_id = message["run_id"]
        if message["type"] == "failed":
            self._release(message["worker"])
        self.done_chunks = {key: value for key, value in self.done_chunks.items() if key[0] != run_id}
        self.store.set_state(run_id, "failed", message["error"])
        self.store.event("run_failed", run_id, error=message["error"], traceback=message.get("traceback"))
        self._end_mlflow(run_id, "FAILED")

    def _chunk_done(self, message: dict[str, Any]) -> None:
        run_id, chunk = message["run_id"], message["chunk"]
        self._release(message["worker"])
        self.trained[run_id] = max(self.trained.get(run_id, 0), chunk + 1)
        self.store.event("chunk_done", run_id, chunk=chunk, step=message["global_step"], metrics=message["metrics"],
                         seconds=message["seconds"], step_seconds=message["step_seconds"], eval_seconds=message["eval_seconds"])
        self._grow_slots(message)
        self.done_chunks[(run_id, chunk)] = message
        row = self.store.run(run_id)
        if row.state == "running":
            self.store.set_state(run_id, "pending")
        run = self._planned(run_id)
        policy = self.sha.get(run.group) if run else None
        if policy is not None and row.state in ("pending", "running") and chunk + 1 < row.total_chunks:
            decision, detail = policy.on_result(run_id, chunk + 1, message["metrics"])
            if detail:
                self.store.event(f"sha_{decision}", run_id, **detail)
            if decision == "stop":
                self.store.set_state(run_id, "stopped")
                self._end_mlflow(run_id, "KILLED")
        if (early := self.durable_first.pop((run_id, chunk), None)) is not None:
            self._chunk_durable(early)

    def _chunk_durable(self, message: dict[str, Any]) -> None:
        """Record a chunk whose checkpoint is on disk (its `chunk_done` may still be on its way)."""
        run_id, chunk = message["run_id"], message["chunk"]
        done = self.done_chunks.pop((run_id, chunk), None)
        if done is None:
            self.durable_first[(run_id, chunk)] = message
            return
        previous = self.store.run(run_id).last_checkpoint
        self.store.record_chunk(run_id, chunk, done["global_step"], message["checkpoint"], done["metrics"], done["seconds"],
                                done["step_seconds"], done["eval_seconds"])
        if previous and previous != message["checkpoint"]:
            shutil.rmtree(previous, ignore_errors=True)
        self.store.event("chunk_durable", run_id, chunk=chunk, bytes=_directory_bytes(Path(message["checkpoint"])))
        row = self.store.run(run_id)
        if row.chunks_done >= row.total_chunks:
            self.store.set_state(run_id, "completed")
            self.store.event("run_completed", run_id, final_checkpoint=message.get("final_checkpoint"))
            self._end_mlflow(run_id, "FINISHED", message.get("final_checkpoint"))

    def _grow_slots(self, message: dict[str, Any]) -> None:
        """`runs_per_device: auto`: after the first chunk on a GPU, add slots for what its memory allows."""
        worker = self.pool.worker(message["worker"])
        if not message.get("total_memory") or worker.gang:
            return
        runnable = sum(view.runnable and view.chunks_done < view.total_chunks for view in self._views())
        slots = slots_for(message["total_memory"], message["peak_memory"], runnable)
        for added in self.pool.grow(worker.device, slots):
            self.store.event("slot_added", None, device=added.device, worker=added.worker_id, footprint=message["peak_memory"])

    def _release(self, worker_id: str) -> None:
        for worker in self.workers:
            if worker.worker_id == worker_id:
                worker.busy_with = None

    def _end_mlflow(self, run_id: str, status: str, final_checkpoint: str | None = None) -> None:
        row = self.store.run(run_id)
        if row.mlflow_run_id:
            if final_checkpoint and run_id in self.configs:
                tracking = self.configs[run_id].tracking
                if tracking is not None and tracking.log_artifacts:
                    self.tracker.log_artifacts(row.mlflow_run_id, final_checkpoint)
            self.tracker.finish(row.mlflow_run_id, status)

    def _check_workers(self) -> None:
        """A dead worker (killed, out of memory, its node lost; for a gang, any of its ranks): the chunk
        it was training is tried once more, then its run fails; the runs it held in memory continue
        on any worker from their last durable chunk."""
        for index, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            rank_error = self.rank_errors.pop(worker.worker_id, None)
            if worker.gang:
                error = f"the gang on {worker.device} stopped ({worker.process.describe()})" + (f": {rank_error}" if rank_error else "")
            else:
                error = f"the worker on {worker.device} died (exit code {worker.process.exitcode}), e.g. out of memory"
            if worker.busy_with:
                self._chunk_lost(worker.busy_with, error)
            for run_id in [run for run, home in self.homes.items() if home == worker.worker_id]:
                self._forget_progress(run_id)
            self.workers[index] = self.pool.respawn(worker)

    def _chunk_lost(self, run_id: str, error: str) -> None:
        chunk = (run_id, self.trained.get(run_id, 0))  # the chunk it was training: the first not yet trained
        self.lost_chunks[chunk] = self.lost_chunks.get(chunk, 0) + 1
        if self.lost_chunks[chunk] <= MAX_LOST_CHUNKS:
            self.store.set_state(run_id, "pending")
            self.store.event("chunk_lost", run_id, chunk=chunk[1], error=error, retry=self.lost_chunks[chunk])
            return
        self.store.set_state(run_id, "failed", error)
        self.store.event("run_failed", run_id, error=error)
        self._end_mlflow(run_id, "FAILED")

    def _forget_progress(self, run_id: str) -> None:
        self.homes.pop(run_id, None)
        self.done_chunks = {key: value for key, value in self.done_chunks.items() if key[0] != run_id}
        # A write that finished before its chunk_done could be sent belongs to the lost attempt.
        self.durable_first = {key: value for key, value in self.durable_first.items() if key[0] != run_id}
        row = self.store.run(run_id)
        self.trained[run_id] = row.chunks_done
        self.store.forget_metrics_after(run_id, self._durable_step(run_id, row.chunks_done))

    def _durable_step(self, run_id: str, chunks: int) -> int:
        run = self._planned(run_id)
        return sum((run.derived.chunk_steps or [])[:chunks]) if run else 0

    def _finish_tracking(self) -> None:
        if self.parent_mlflow_id:
            self.tracker.finish(self.parent_mlflow_id, "FINISHED")

    # ------------------------------------------------------------ interactive control

    def _apply_requests(self) -> None:
        from finetune.schedule.control import apply_request

        for request_id, kind, run_id, payload in self.store.pending_requests():
            status = apply_request(self, kind, run_id, payload)
            if status is None:
                continue  # the run is training a chunk: applied at its boundary
            self.store.finish_request(request_id, status)
            self.store.event(f"ctl_{kind}", run_id, status=status, **payload)
            self.on_change()


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file()) if directory.is_dir() else 0
