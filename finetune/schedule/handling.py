"""How the controller takes its workers' reports (`schedule.messages`): one `match` over the typed messages,
after dropping (and logging) those of a worker incarnation that is gone or of a task its worker no longer
trains; a state change the table forbids fails that run with the reason, never the experiment. A chunk's
`ChunkDone` becomes its one record for the search (evaluation merged with the training metrics logged
during the chunk); its `ChunkDurable` makes it durable, and a run whose chunks are all durable is complete,
whatever a late stop said. Part of `Controller`, kept apart for its size."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.schedule.messages import (
    ChunkDone,
    ChunkDurable,
    MetricsLogged,
    RankError,
    RunFailed,
    StepProgress,
    UserCodeWarning,
    WorkerExit,
    WorkerMessage,
    WriteFailed,
    is_stale,
)
from finetune.schedule.records import ChunkRecord, ChunkStatus, IllegalTransition, RunRecord, RunStatus
from finetune.schedule.search import chunk_result
from finetune.search.contract import ChunkResult

if TYPE_CHECKING:
    from finetune.schedule.controller import Controller as _Controller

    Base = _Controller
else:
    Base = object


class WorkerReports(Base):
    def _handle(self, message: WorkerMessage) -> None:
        try:
            self._dispatch_message(message)
        except IllegalTransition as illegal:  # a bug's consequence stays with its run
            run_id = getattr(message, "run_id", None)
            self.store.event("illegal_transition", run_id, error=str(illegal), message=type(message).__name__)
            if run_id in self.runs:
                self._force_fail(self.runs[run_id], f"internal error: {illegal}")
        self.on_change()

    def _stale(self, message: WorkerMessage) -> bool:
        """A report of a worker incarnation that is gone, or of a task its worker is not training now: logged
        and dropped (`messages.is_stale`)."""
        worker = next((worker for worker in self.workers if worker.worker_id == message.worker), None)
        current = None if worker is None else (worker.incarnation, *worker.task_of(getattr(message, "run_id", None)))
        if not is_stale(message, current):
            return False
        self.store.event("stale_message", getattr(message, "run_id", None), message=type(message).__name__,
                         worker=message.worker, incarnation=message.incarnation, ticket=getattr(message, "ticket", None))
        return True

    def _dispatch_message(self, message: WorkerMessage) -> None:
        if isinstance(message, StepProgress):  # only shown; one of a worker that is gone is dropped unsaid
            worker = next((worker for worker in self.workers if worker.worker_id == message.worker), None)
            if (worker is not None and worker.incarnation == message.incarnation
                    and message.run_id in (worker.busy_with, *worker.riders)):  # riders: a fused group's other members
                self.on_progress(message.report)
            return
        if not isinstance(message, (MetricsLogged, ChunkDone, ChunkDurable, RunFailed, WriteFailed, UserCodeWarning, RankError,
                                    WorkerExit)):
            raise TypeError(f"unknown worker message: {message!r}")
        if not isinstance(message, (ChunkDurable, WriteFailed)) and self._stale(message):
            return  # a durable chunk stays valid whoever wrote it: its ticket decides (`_chunk_durable`)
        match message:
            case MetricsLogged():
                self._metrics(message)
            case ChunkDone():
                self._chunk_done(message)
            case ChunkDurable():
                self._chunk_durable(message)
            case RunFailed():
                self._release(message.worker, message.run_id)
                self.folder.check(message.error)  # a full disk, the folder moved: the experiment stops, no run fails
                self._fail(message.run_id, message.error, traceback=message.traceback)
            case WriteFailed():
                self.folder.check(message.error)
                self._fail(message.run_id, message.error, chunk=message.chunk, stage="writing its checkpoint")
            case UserCodeWarning():  # a user's function failed: its value is missing, the run goes on
                self.store.event("warning", message.run_id, chunk=message.chunk, source=message.source,
                                 metric=message.name, function=message.function, error=message.error)
            case RankError():  # the gang ends; `_check_workers` retries or fails its run
                self.pool.worker(message.worker).rank_error = f"rank {message.rank}: {message.error}"
                self.store.event("rank_error", message.run_id, worker=message.worker, rank=message.rank,
                                 error=message.error, traceback=message.traceback)
            case WorkerExit():
                self.store.event("worker_exit", None, worker=message.worker, resident_runs=list(message.resident_runs))

    def _force_fail(self, record: RunRecord, error: str) -> None:
        """Fail a run after an illegal transition: recorded with the reason, its chunks in flight forgotten."""
        self.chunks = {key: chunk for key, chunk in self.chunks.items() if key[0] != record.run_id}
        for worker in self.workers:
            worker.riders.pop(record.run_id, None)
            if worker.busy_with == record.run_id:
                worker.busy_with = None
        if record.status in (RunStatus.FAILED, RunStatus.DELETED, RunStatus.COMPLETED):
            return
        self._set_status(record, RunStatus.FAILED, error)  # allowed from every state not handled above
        self.store.event("run_failed", record.run_id, error=error)
        self.tracking.end(record, "FAILED")

    def _metrics(self, message: MetricsLogged) -> None:
        if message.ticket in self.logged:
            self.logged[message.ticket].append(message.metrics)
        self.store.log_metrics(message.run_id, message.step, message.metrics)
        self.tracking.log_metrics(self.runs.get(message.run_id), message.step, message.metrics)

    def _fail(self, run_id: str, error: str, **detail: object) -> None:
        record = self.runs[run_id]
        self.chunks = {key: chunk for key, chunk in self.chunks.items() if key[0] != run_id}
        if record.status in (RunStatus.FAILED, RunStatus.DELETED):
            return
        if record.status is RunStatus.COMPLETED:
            raise AssertionError(f"run {run_id} failed after it completed: {error}")
        self._set_status(record, RunStatus.FAILED, error)
        self.store.event("run_failed", run_id, error=error, **detail)
        self.tracking.end(record, "FAILED")

    def _chunk_done(self, message: ChunkDone) -> None:
        worker = self._release(message.worker, message.run_id)
        worker.resident_keys = set(message.loaded_bases)
        for other in self.runs.values():  # what the worker evicted is held by its durable checkpoint only
            if other.home == worker.worker_id and other.run_id not in message.resident_runs:
                other.home = None
        record, chunk = self.runs[message.run_id], self.chunks.get((message.run_id, message.chunk))
        logged = self.logged.pop(message.ticket, [])
        if chunk is None or chunk.ticket != message.ticket:  # the run failed meanwhile (an earlier chunk's write)
            return
        result = chunk_result(record, message.chunk + 1, message.global_step, message.metrics, logged)
        message = dataclasses.replace(message, metrics=result.metrics)  # the chunk's one record, as the store keeps it
        record.trained_chunks = max(record.trained_chunks, message.chunk + 1)
        self.store.log_answers(message.run_id, message.answers)
        self.store.event("chunk_done", message.run_id, chunk=message.chunk, step=message.global_step, metrics=message.metrics,
                         seconds=message.seconds, step_seconds=message.step_seconds, eval_seconds=message.eval_seconds,
                         tokens=message.tokens)
        self._grow_slots(worker, message)
        if record.status is RunStatus.RUNNING:
            self._set_status(record, RunStatus.PENDING)
        written, chunk.done = chunk.status is ChunkStatus.WRITTEN, message
        chunk.status = ChunkStatus.TRAINED
        self._decide(record, result)
        if written:
            assert chunk.durable is not None
            self._record_durable(record, chunk, chunk.durable)

    def _decide(self, record: RunRecord, result: ChunkResult) -> None:
        """The search's verdict on the run (successive halving's rungs, a study's pruner, PBT's exploit)."""
        stop, events = self.search.on_chunk(self, record, result)
        self._record_events(events)
        if stop:
            self._set_status(record, RunStatus.STOPPED)
            self.tracking.end(record, "KILLED")

    def _chunk_durable(self, message: ChunkDurable) -> None:
        """A chunk's checkpoint is on disk; its `ChunkDone` may still be on its way. A message of an attempt
        that was lost with its worker (no record, a lost one, or one dispatched since) is dropped."""
        chunk = self.chunks.get((message.run_id, message.chunk))
        if chunk is None or chunk.status is ChunkStatus.LOST or chunk.ticket != message.ticket:
            return
        if chunk.status is ChunkStatus.TRAINING:
            chunk.status, chunk.durable = ChunkStatus.WRITTEN, message
            return
        self._record_durable(self.runs[message.run_id], chunk, message)

    def _record_durable(self, record: RunRecord, chunk: ChunkRecord, durable: ChunkDurable) -> None:
        done = chunk.done
        assert done is not None
        del self.chunks[(chunk.run_id, chunk.chunk)]
        self.store.record_chunk(record.run_id, chunk.chunk, done.global_step, durable.checkpoint, done.metrics, done.seconds,
                                done.step_seconds, done.eval_seconds, done.started_at, done.finished_at)
        previous, record.last_checkpoint = record.last_checkpoint, durable.checkpoint
        record.durable_chunks += 1
        self.keeper.durable(record.run_id, previous, durable.checkpoint, done.metrics)
        self.store.event("chunk_durable", record.run_id, chunk=chunk.chunk, bytes=_directory_bytes(Path(durable.checkpoint)))
        if record.durable_chunks >= record.total_chunks and record.status in (RunStatus.PENDING, RunStatus.STOPPED):
            # every chunk is durable: completed, whatever a late stop said
            self._set_status(record, RunStatus.COMPLETED)
            final = durable.final_checkpoint and self.store.stored_path(durable.final_checkpoint)
            self.store.event("run_completed", record.run_id, final_checkpoint=final)
            self.tracking.end(record, "FINISHED", durable.final_checkpoint)


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file()) if directory.is_dir() else 0
