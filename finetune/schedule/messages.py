"""What the controller and its workers say to each other: typed, frozen values.

Tasks go to a worker's task queue (`ChunkTask`, or None to stop); everything a worker reports goes
to the pool's one result queue as a `WorkerMessage`. The same values travel through multiprocessing
queues and Ray queues (both pickle them); the controller handles them in one `match` that refuses
any other kind. Nothing here imports torch.

Every report carries the worker's incarnation (a respawned worker keeps its name and gets a new
incarnation) and, where it concerns a task, the task's dispatch ticket: the controller drops (and logs)
a report whose incarnation or ticket is not the worker's current one, so a late message of a dead
worker can never free or fail what its replacement is doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from finetune.evaluate.samples import KeptAnswer
from finetune.plan.model import PlannedRun
from finetune.train.progress import StepReport


@dataclass(frozen=True)
class WorkerResources:
    """What a worker process may use: its state budgets (None: the defaults), how many workers share
    its device and the machine, and its torch CPU threads (None: its machine's cores / host_share)."""

    gpu_gb: float | None
    cpu_gb: float | None
    gpu_share: int
    host_share: int
    threads: int | None = None

    def torch_threads(self, cores: int) -> int:
        return self.threads or max(1, cores // self.host_share)


@dataclass(frozen=True)
class ChunkTask:
    """Train chunk `chunk` of `run`. `ticket` names this dispatch; the worker's reports of it carry it,
    so that a report of an earlier attempt (from a worker that died since) is told apart."""

    ticket: int
    run: PlannedRun
    chunk: int
    resume_from: str | None
    max_eval_samples: int | None
    evaluate: bool  # the controller's evaluation cadence (experiment.eval_every_chunks, the last chunk)
    judged: bool = False  # the search compares runs after this chunk: measure its metric here


@dataclass(frozen=True)
class FusedTask:
    """Train these chunks of several runs as one fused group (`experiment.fuse`); each is reported as if
    it were trained alone (its own ChunkDone and ChunkDurable, with its own ticket)."""

    tasks: tuple[ChunkTask, ...]


@dataclass(frozen=True)
class MetricsLogged:
    """Training metrics at a logging step (loss, learning rate, grad norm, rewards)."""

    worker: str
    run_id: str
    step: int
    metrics: dict[str, float]
    ticket: int = -1  # of the task it was logged in
    incarnation: int = 0


@dataclass(frozen=True)
class ChunkDone:
    """A chunk is trained and evaluated; its worker is free. `resident_runs` and `loaded_bases` are what
    the worker holds in memory now (after any eviction), so the policy's affinity stays true."""

    worker: str
    ticket: int
    run_id: str
    chunk: int
    global_step: int
    metrics: dict[str, float]
    seconds: float
    step_seconds: float
    eval_seconds: float
    started_at: float  # wall clock (time.time()) when the worker began the chunk
    finished_at: float
    peak_memory: int = 0
    total_memory: int = 0
    resident_runs: tuple[str, ...] = ()
    loaded_bases: tuple[str, ...] = ()
    incarnation: int = 0
    tokens: int = 0  # trained in the chunk (attended positions)
    answers: tuple[KeptAnswer, ...] = ()  # a few generated answers, to be read (the base's at step 0 included)


@dataclass(frozen=True)
class StepProgress:
    """A worker's report of where a run is within the chunk it trains (at most one a second per run). Only for
    showing progress: nothing is recorded."""

    worker: str
    report: StepReport
    incarnation: int = 0

    @property
    def run_id(self) -> str:
        return self.report.run_id


@dataclass(frozen=True)
class ChunkDurable:
    """A chunk's checkpoint is on disk (written in the background; may arrive before its ChunkDone)."""

    worker: str
    ticket: int
    run_id: str
    chunk: int
    checkpoint: str
    final_checkpoint: str | None = None
    incarnation: int = 0


@dataclass(frozen=True)
class RunFailed:
    """Training the run raised; the worker has dropped it and goes on."""

    worker: str
    run_id: str
    error: str
    traceback: str = ""
    ticket: int = -1
    incarnation: int = 0


@dataclass(frozen=True)
class WriteFailed:
    """The background writer could not make a chunk durable."""

    worker: str
    run_id: str
    chunk: int
    error: str
    ticket: int = -1
    incarnation: int = 0


@dataclass(frozen=True)
class UserCodeWarning:
    """A user's function (`source`: e.g. eval_conf.custom[1]) failed or misbehaved at a chunk; the run goes on."""

    worker: str
    run_id: str
    chunk: int
    source: str
    name: str
    function: str
    error: str
    incarnation: int = 0


@dataclass(frozen=True)
class RankError:
    """One rank of a gang failed and exits; the controller ends and replaces the whole gang."""

    worker: str
    rank: int
    run_id: str
    error: str
    traceback: str = ""
    incarnation: int = 0


@dataclass(frozen=True)
class WorkerExit:
    """A worker stopped serving (it was asked to)."""

    worker: str
    resident_runs: tuple[str, ...] = ()
    incarnation: int = 0


WorkerMessage = Union[MetricsLogged, StepProgress, ChunkDone, ChunkDurable, RunFailed, WriteFailed, UserCodeWarning, RankError,
                      WorkerExit]


def is_stale(message: WorkerMessage, worker: tuple[int, int, str | None] | None) -> bool:
    """Whether `message` is of a worker incarnation that is gone, or (ChunkDone, RunFailed) of a task its worker
    is not training now. `worker`: its current (incarnation, ticket, run it trains), None if it is unknown."""
    if worker is None:
        return True
    incarnation, ticket, busy_with = worker
    if message.incarnation != incarnation:
        return True
    return isinstance(message, (ChunkDone, RunFailed)) and (ticket != message.ticket or busy_with != message.run_id)
