"""The controller's state: one record per run and one per pending chunk, with explicit states.

Every change of a run's state goes through `check_transition`: a change the table below does not
allow is a bug in the controller, and it fails loudly rather than leaving a run in a state nothing
will ever move it out of.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from finetune.plan.model import PlannedRun
from finetune.schedule.messages import ChunkDone, ChunkDurable


class RunStatus(str, Enum):
    PENDING = "pending"  # waits for a worker
    RUNNING = "running"  # a worker trains one of its chunks
    STOPPED = "stopped"  # by the user or by successive halving; `ctl resume` continues it
    COMPLETED = "completed"
    FAILED = "failed"  # `ctl resume` retries it from its last durable chunk
    DELETED = "deleted"


ALLOWED_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.RUNNING, RunStatus.STOPPED, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.DELETED}),
    # A running run is stopped or deleted only at its chunk boundary, after it is pending again.
    RunStatus.RUNNING: frozenset({RunStatus.PENDING, RunStatus.FAILED}),
    # A stopped run's last chunk may still fail to be written, or become durable (then the run is complete).
    RunStatus.STOPPED: frozenset({RunStatus.PENDING, RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.DELETED}),
    RunStatus.COMPLETED: frozenset({RunStatus.DELETED}),
    RunStatus.FAILED: frozenset({RunStatus.PENDING, RunStatus.DELETED}),
    RunStatus.DELETED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A run state change the controller must never make."""


def check_transition(run_id: str, current: RunStatus, new: RunStatus) -> None:
    if new not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(f"run {run_id}: {current.value} -> {new.value} is not an allowed transition")


@dataclass
class RunRecord:
    """What the controller knows of one run. `durable_chunks` and `last_checkpoint` mirror the state
    store; `trained_chunks` counts chunks trained, durable or not; `home` is the worker that holds
    the run in memory (None: only its durable checkpoint holds it)."""

    planned: PlannedRun
    config: Any  # the validated config model
    base_key: str
    gang: str
    status: RunStatus
    position: int
    durable_chunks: int
    last_checkpoint: str | None
    mlflow_run_id: str | None
    trained_chunks: int
    home: str | None = None
    fuse_key: str = ""  # runs with one non-empty key may train as one fused group (`schedule.fusing`)

    @property
    def run_id(self) -> str:
        return self.planned.run_id

    @property
    def total_chunks(self) -> int:
        return len(self.planned.derived.chunk_steps or [])

    @property
    def active(self) -> bool:
        return self.status in (RunStatus.PENDING, RunStatus.RUNNING)

    @property
    def unfinished(self) -> bool:
        return self.active and self.trained_chunks < self.total_chunks

    def steps_through(self, chunks: int) -> int:
        """The global step at the end of its first `chunks` chunks."""
        return sum((self.planned.derived.chunk_steps or [])[:chunks])


class ChunkStatus(str, Enum):
    TRAINING = "training"  # a worker has it
    TRAINED = "trained"  # trained and evaluated; its checkpoint is not on disk yet
    WRITTEN = "written"  # its checkpoint is on disk, its ChunkDone not here yet
    LOST = "lost"  # its worker died; tried again (attempts counts the tries) or its run failed


@dataclass
class ChunkRecord:
    """A (run, chunk) between its dispatch and its row in the state store."""

    run_id: str
    chunk: int
    worker: str
    ticket: int  # of its latest dispatch
    status: ChunkStatus = ChunkStatus.TRAINING
    attempts: int = 1
    done: ChunkDone | None = None
    durable: ChunkDurable | None = None
