"""The controller: owns the plan, the policy and the state store; feeds (run, chunk) tasks to workers.

A chunk has two moments. `ChunkDone`: the worker trained and evaluated it and is free for the
next task, so the policy decides at once. `ChunkDurable`: its checkpoint is on disk, and only
then does the state store record it. Kill the controller at any moment: `finetune run --resume`
continues every run from its last durable chunk.

The controller's state is its `RunRecord`s and `ChunkRecord`s (`schedule.records`); every run state
change goes through `_set_status`, every worker message through the one `match` of `_handle` (`schedule.handling`). A message
of a worker incarnation that is gone, or of a task the worker no longer trains, is logged and dropped; a
state change the table forbids fails that run (with the reason), never the experiment.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from finetune.config.validation import CONFIG_ADAPTER
from finetune.io import write_json_atomic
from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.control import CloneParent, RequestRejected, apply_request
from finetune.schedule.folder import FolderWatch, remove_leftovers
from finetune.schedule.gang import gang_kind
from finetune.schedule.fusing import fuse_groups, fuse_key, waiting_views
from finetune.schedule.handling import WorkerReports
from finetune.schedule.messages import ChunkDone, ChunkTask, FusedTask
from finetune.schedule.policy import RunView, Task, WorkerView, assign, slots_for
from finetune.schedule.pool import SlotPool, WorkerHandle
from finetune.schedule.preparation import RunUnprepared, initial_checkpoint, prepare_run
from finetune.schedule.records import ChunkRecord, ChunkStatus, RunRecord, RunStatus, check_transition
from finetune.schedule.search import SearchDriver
from finetune.schedule.keeping import CheckpointKeeper, inherit_chunks
from finetune.schedule.store import StateStore
from finetune.schedule.tracking import ExperimentTracking, Tracker
from finetune.train.progress import StepReport

POLL_SECONDS = 0.2
MAX_LOST_CHUNKS = 1  # a chunk whose worker dies again (out of memory, say) fails its run rather than loops


@dataclass
class Controller(WorkerReports):
    plan: RunPlan
    root: Path
    store: StateStore
    tracker: Tracker
    pool: SlotPool
    on_change: Callable[[], None] = lambda: None
    on_progress: Callable[[StepReport], None] = lambda progress: None  # a worker's step progress, to show
    # How a clone is prepared as a new run (`preparation.prepare_run`: preflight, data, derived values).
    prepare_run: Callable[[RunPlan, Path, PlannedRun, list[str] | None], PlannedRun] = prepare_run
    search: SearchDriver = field(default_factory=SearchDriver)  # successive halving, optuna, pbt
    runs: dict[str, RunRecord] = field(default_factory=dict)  # in plan order
    chunks: dict[tuple[str, int], ChunkRecord] = field(default_factory=dict)  # dispatched, not yet in the store
    poll_seconds: float = POLL_SECONDS
    tickets: int = 0  # dispatches so far
    logged: dict[int, list[dict[str, float]]] = field(default_factory=dict)  # ticket -> training logs of its chunk
    winding_down: bool = False  # interrupted: no new chunk is dispatched; the loop ends once the workers are idle
    tracking: ExperimentTracking = field(init=False)
    keeper: CheckpointKeeper = field(init=False)
    folder: FolderWatch = field(init=False)

    def __post_init__(self) -> None:
        self.tracking = ExperimentTracking(self.tracker, self.root, self.store)
        self.keeper = CheckpointKeeper(self.plan, self.store.root)
        self.folder = FolderWatch(self.root)

    # ------------------------------------------------------------ set-up

    @property
    def workers(self) -> list[WorkerHandle]:
        return self.pool.workers

    def start(self) -> None:
        for leftover in remove_leftovers(self.root):  # half-written by a controller that stopped (a full disk, say)
            self.store.event("leftover_removed", None, path=self.store.stored_path(leftover))
        for run in self.plan.runs:
            self._register(run)
        for record in self.runs.values():
            if record.status is RunStatus.RUNNING:  # the controller stopped while it trained
                self._set_status(record, RunStatus.PENDING)
            if record.status is RunStatus.STOPPED and record.durable_chunks >= record.total_chunks:
                self._set_status(record, RunStatus.COMPLETED)  # stopped during its last chunk, which is durable
                self.store.event("run_completed", record.run_id, reason="every chunk was durable when it was stopped")
        for run_id, error in self.plan.failed.items():
            if self.runs[run_id].status is not RunStatus.FAILED:
                self._set_status(self.runs[run_id], RunStatus.FAILED, error)
                self.store.event("run_failed", run_id, error=error, stage="preparing data")
        chunk_rows = self.store.chunk_rows()
        self._record_events(self.search.start(self, chunk_rows))
        self.keeper.resume(chunk_rows)
        self.tracking.start(list(self.runs.values()))

    def _register(self, run: PlannedRun) -> RunRecord:
        """Add a run to the store and the records, validating its config once for the whole experiment."""
        from finetune.train.bases import base_key

        self.store.add_run(run.run_id, run.label, len(run.derived.chunk_steps or []), run.parent_run_id)
        row = self.store.run(run.run_id)
        config = CONFIG_ADAPTER.validate_python(run.located(self.root).config)
        record = RunRecord(run, config, base_key(config), gang_kind(config.experiment), RunStatus(row.state), row.position,
                           row.chunks_done, row.last_checkpoint, row.mlflow_run_id, row.chunks_done)
        record.fuse_key = fuse_key(config, record.base_key, record.gang)
        self.runs[run.run_id] = record
        for added in self.pool.ensure_workers(record.gang):
            self.store.event("workers_started", None, worker=added.worker_id, device=added.device, gang=added.gang)
        return record

    def _record_events(self, events: list[tuple[str | None, str, dict]]) -> None:
        for run_id, kind, detail in events:
            self.store.event(kind, run_id, **detail)

    # ------------------------------------------------------------ the interface of interactive control

    def record(self, run_id: str) -> RunRecord | None:
        return self.runs.get(run_id)

    def run_ids(self) -> set[str]:
        return set(self.runs)

    def training(self, run_id: str) -> bool:
        """A worker is training one of its chunks."""
        return any(worker.busy_with == run_id or run_id in worker.riders for worker in self.workers)

    def busy(self, run_id: str) -> bool:
        """Training a chunk, or a trained chunk not yet durable."""
        return self.training(run_id) or any(
            chunk.run_id == run_id and chunk.status is ChunkStatus.TRAINED for chunk in self.chunks.values())

    def set_status(self, run_id: str, status: RunStatus) -> None:
        record = self.runs[run_id]
        if status is RunStatus.PENDING and record.status is RunStatus.FAILED:
            self._forget_progress(record)  # retried from its last durable chunk, with fresh tries
            self.chunks = {key: chunk for key, chunk in self.chunks.items() if key[0] != run_id}
        self._set_status(record, status)

    def prepare(self, run: PlannedRun) -> PlannedRun:
        try:
            return self.prepare_run(self.plan, self.root, run, self.local_devices())
        except RunUnprepared as unprepared:
            raise RequestRejected(unprepared.problems) from None

    def add_run(self, run: PlannedRun) -> None:
        """Add a run to the plan on disk, then to the records (a plan that cannot be written changes nothing)."""
        plan = self.plan.model_copy(update={"runs": [*self.plan.runs, run]})
        write_json_atomic(self.root / "plan.json", plan.model_dump(mode="json"))
        self.plan = plan
        self.tracking.add(self._register(run))

    def inherit(self, run: PlannedRun, parent: CloneParent) -> None:
        """A clone that continues `parent` (PBT's exploit) starts with the parent's durable chunks as its own."""
        inherit_chunks(self.store, self.root, run, parent)

    def local_devices(self) -> list[str] | None:
        """The devices of this machine's workers; None on a Ray cluster, whose workers check their own."""
        return self.pool.local_devices()

    # ------------------------------------------------------------ the loop

    def step(self) -> bool:
        """One turn: requests, tasks, worker messages, dead workers. False once all is done (`folder`: the environment),
        or, winding down, once no chunk is being trained or written."""
        self.folder.check()
        self._apply_requests()
        if not self.winding_down:
            self._record_events(self.search.fill(self))
            self._dispatch()
        idle = not any(worker.busy_with or worker.riders for worker in self.workers) and not self._awaiting_durability()
        if idle and (self.winding_down or self._nothing_left()):
            return False
        self._drain()
        self._check_workers()
        return True

    def _awaiting_durability(self) -> bool:
        return any(chunk.status is ChunkStatus.TRAINED for chunk in self.chunks.values())

    def _nothing_left(self) -> bool:
        return not any(record.unfinished for record in self.runs.values())

    def _set_status(self, record: RunRecord, status: RunStatus, error: str | None = None) -> None:
        check_transition(record.run_id, record.status, status)
        record.status = status
        self.store.set_state(record.run_id, status.value, error)
        self.search.on_status(record)

    def _views(self) -> list[RunView]:
        return [
            RunView(r.run_id, r.position, r.trained_chunks, r.total_chunks, r.active, r.base_key, r.planned.group, r.home,
                    durable=r.trained_chunks == r.durable_chunks, gang=r.gang)
            for r in self.runs.values()
        ]

    def _dispatch(self) -> None:
        busy = {run for worker in self.workers for run in (worker.busy_with, *worker.riders) if run}
        workers = [
            WorkerView(worker.worker_id, self.pool.units(worker), worker.gang,
                       bool(worker.busy_with or worker.riders) or not worker.process.is_alive(), frozenset(worker.resident_keys))
            for worker in self.workers
        ]
        assignments = assign(self._views(), workers, busy)
        setting = next(iter(self.runs.values())).config.experiment.fuse if self.runs else "off"
        for worker_id, group in fuse_groups(assignments, waiting_views(self.runs.values()), busy, setting,
                                            lambda view: Task(view.run_id, view.chunks_done)):
            worker = self.pool.worker(worker_id)
            chunk_tasks = tuple(self._start_chunk(worker, task) for task in group)
            worker.tasks.put(chunk_tasks[0] if len(chunk_tasks) == 1 else FusedTask(chunk_tasks))
            worker.busy_with, worker.ticket = group[0].run_id, chunk_tasks[0].ticket
            worker.riders = {task.run.run_id: task.ticket for task in chunk_tasks[1:]}
            if len(group) > 1:
                self.store.event("fused_group", group[0].run_id, worker=worker_id, runs=[task.run_id for task in group],
                                 chunks=[task.chunk for task in group])
            self.on_change()

    def _start_chunk(self, worker: WorkerHandle, task: Task) -> ChunkTask:
        """The task of one run's chunk on `worker`, and its records: a ticket, the chunk, the run's home and state."""
        record = self.runs[task.run_id]
        every = record.config.experiment.eval_every_chunks
        self.tickets += 1
        chunk_task = ChunkTask(
            self.tickets, record.planned.located(self.root), task.chunk, record.last_checkpoint or initial_checkpoint(record.config),
            record.config.experiment.max_eval_samples,
            evaluate=(task.chunk + 1) % every == 0 or task.chunk == record.total_chunks - 1,
            judged=self.search.measures(record, task.chunk + 1),
        )
        self.logged[self.tickets] = []
        earlier = self.chunks.get((task.run_id, task.chunk))
        attempts = earlier.attempts + 1 if earlier is not None and earlier.status is ChunkStatus.LOST else 1
        self.chunks[(task.run_id, task.chunk)] = ChunkRecord(task.run_id, task.chunk, worker.worker_id, self.tickets, attempts=attempts)
        worker.resident_keys.add(record.base_key)
        record.home = worker.worker_id
        self._set_status(record, RunStatus.RUNNING)
        self.store.event("chunk_started", task.run_id, chunk=task.chunk, device=worker.device, worker=worker.worker_id,
                         attempt=attempts)
        return chunk_task

    def _drain(self) -> None:
        try:
            message = self.pool.results.get(timeout=self.poll_seconds) if self.poll_seconds else self.pool.results.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self.pool.results.get_nowait()
            except queue.Empty:
                return

    def _grow_slots(self, worker: WorkerHandle, message: ChunkDone) -> None:
        """`runs_per_device: auto`: after the first chunk on a GPU, add slots for what its memory allows."""
        if not message.total_memory or worker.gang:
            return
        runnable = sum(record.unfinished for record in self.runs.values())
        slots = slots_for(message.total_memory, message.peak_memory, runnable)
        for added in self.pool.grow(worker.device, slots):
            self.store.event("slot_added", None, device=added.device, worker=added.worker_id, footprint=message.peak_memory)

    def _release(self, worker_id: str, run_id: str | None = None) -> WorkerHandle:
        """The worker is done with the run's chunk (and free once every run of its fused group is)."""
        worker = self.pool.worker(worker_id)
        if run_id in worker.riders:
            del worker.riders[run_id]
        else:
            worker.busy_with, worker.ticket = None, -1
        return worker

    def _check_workers(self) -> None:
        """A dead worker (killed, out of memory, its node lost; for a gang, any of its ranks): the chunk
        it was training is tried once more, then its run fails; the runs it held in memory continue
        on any worker from their last durable chunk."""
        for index, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            if worker.gang:
                error = f"the gang on {worker.device} stopped ({worker.process.describe()})"
                error += f": {worker.rank_error}" if worker.rank_error else ""
            else:
                error = f"the worker on {worker.device} died (exit code {worker.process.exitcode}), e.g. out of memory"
            for run_id, ticket in [(worker.busy_with, worker.ticket), *worker.riders.items()]:
                self.logged.pop(ticket, None)  # the training logs of a chunk that is lost with its worker
                if run_id:
                    self._chunk_lost(self.runs[run_id], error)
            for record in self.runs.values():
                if record.home == worker.worker_id:
                    self._forget_progress(record)
            self.workers[index] = self.pool.respawn(worker)

    def _chunk_lost(self, record: RunRecord, error: str) -> None:
        chunk = self.chunks.get((record.run_id, record.trained_chunks))  # the one it was training: the first not trained
        if chunk is None:  # its run failed meanwhile
            return
        chunk.status = ChunkStatus.LOST
        if chunk.attempts <= MAX_LOST_CHUNKS:
            self._set_status(record, RunStatus.PENDING)
            self.store.event("chunk_lost", record.run_id, chunk=chunk.chunk, error=error, retry=chunk.attempts)
        else:
            self._fail(record.run_id, error)

    def _forget_progress(self, record: RunRecord) -> None:
        """The run goes on from its last durable chunk: what it trained since is gone (a lost chunk stays
        counted)."""
        record.home = None
        self.chunks = {key: chunk for key, chunk in self.chunks.items()
                       if key[0] != record.run_id or chunk.status is ChunkStatus.LOST}
        record.trained_chunks = record.durable_chunks
        self.store.forget_metrics_after(record.run_id, record.steps_through(record.durable_chunks))

    # ------------------------------------------------------------ interactive control

    def _apply_requests(self) -> None:
        waiting: set[str] = set()  # runs with a request put off: their later requests wait behind it, in order
        for request_id, kind, run_id, payload in self.store.pending_requests():
            try:
                status = None if run_id in waiting else apply_request(self, kind, run_id, payload)
            except Exception as error:  # a fault in one request never stops the experiment
                status = f"rejected: {type(error).__name__}: {error}"
            if status is None:
                waiting.add(run_id)  # the run is training a chunk: applied at its boundary
                continue
            self.store.finish_request(request_id, status)
            self.store.event(f"ctl_{kind}", run_id, status=status, **(payload if isinstance(payload, dict) else {}))
            self.on_change()

