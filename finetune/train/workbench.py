"""A worker's bench: the chunk step, over three pieces chosen once per worker.

`Workbench.train_chunk` is what a worker does for a (run, chunk) task: find the run's session
(building it on the run's first chunk, or restoring it from its durable checkpoint after a crash
or a move), train to the chunk boundary, evaluate, take a CPU snapshot and hand it to the
background writer, which makes the chunk durable while the device trains the next one.

The pieces: the model cache (`bases.BaseCache`), the session cache (`session_cache.SessionCache`)
and how runs share them (`sharing`: a shared base on one device, or a gang rank's own model).
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from finetune.evaluate.samples import KeptAnswer
from finetune.io import identity, mkdir_under, remove_ghost
from finetune.plan.model import PlannedRun
from finetune.train.bases import BaseCache, LoadedBase
from finetune.train.bench_evaluation import BenchEvaluation
from finetune.train.checkpoint import DurableWriter, WriteJob, write_run_state
from finetune.train.progress import StepMeter, StepReport
from finetune.train.residency import Budgets
from finetune.train.session import MetricsSink, RunSession, RunState
from finetune.train.session_cache import SessionCache
from finetune.train.resume import resume_session
from finetune.train.sharded import ShardedSession, ShardedState, is_sharded, publish_shards
from finetune.train.sharing import GangStrategy, SharedBaseStrategy, SharingStrategy

logger = logging.getLogger(__name__)
DurableListener = Callable[[str, int, str, "str | None"], None]  # (run_id, chunk, checkpoint, final checkpoint)
WriteFailureListener = Callable[[str, int, str], None]  # (run_id, chunk, error)
WarningListener = Callable[[str, int, Any], None]  # (run_id, chunk, evaluate.sandbox.UserCodeFailure)


@dataclass
class ChunkOutcome:
    run_id: str
    chunk: int
    global_step: int
    checkpoint: str
    metrics: dict[str, float]
    final: bool
    step_seconds: float
    eval_seconds: float
    seconds: float
    started_at: float  # wall clock
    finished_at: float
    peak_memory: int = 0
    total_memory: int = 0
    tokens: int = 0  # trained in the chunk (attended positions)
    answers: tuple[KeptAnswer, ...] = ()  # generated answers kept to be read (the base's at step 0 included)


@dataclass
class FusedMember:
    """One member's chunk in a fused group (what `train_chunk` takes for one run)."""

    run: PlannedRun
    config: Any
    chunk: int
    resume_from: str | None
    max_eval_samples: int | None
    evaluate: bool = True
    judged: bool = False


def chunk_boundary(run: PlannedRun, chunk: int) -> int:
    """The global step at which chunk `chunk` (0-based; -1: before the first) ends."""
    assert run.derived.chunk_steps is not None
    return sum(run.derived.chunk_steps[: chunk + 1])


def eval_subset(dataset: Any, limit: int | None) -> Any:
    if dataset is None or limit is None or len(dataset) <= limit:
        return dataset
    return dataset.select(range(limit))


class Workbench:
    """What a worker holds. `gang_rank`: this process is that rank of a gang (`sharing.GangStrategy`)."""

    def __init__(self, root: Path, device: str, budgets: Budgets, writer: DurableWriter | None = None,
                 sink: MetricsSink | None = None, on_durable: DurableListener | None = None,
                 on_write_failed: WriteFailureListener | None = None, gang_rank: int | None = None,
                 on_warning: WarningListener | None = None,
                 on_progress: Callable[[StepReport], None] | None = None) -> None:
        self.root, self.device, self.budgets = root, device, budgets
        self.root_identity = identity(root)
        self.strategy: SharingStrategy = SharedBaseStrategy() if gang_rank is None else GangStrategy(gang_rank)
        self.writer = writer or DurableWriter()
        self.sink = sink
        self.on_durable = on_durable or (lambda run_id, chunk, checkpoint, final: None)
        self.on_write_failed = on_write_failed or (lambda run_id, chunk, error: None)
        self.on_warning = on_warning or (lambda run_id, chunk, failure: None)
        self.bases = BaseCache(root, device, self.strategy.writes_files, self.strategy.freeze_bases)
        self.sessions = SessionCache(self.writer.wait_for)
        self.evaluation = BenchEvaluation(sink, lambda run_id, chunk, failure: self.on_warning(run_id, chunk, failure),
                                          self._base_of)
        self.fuse_refusals: set[str] = set()  # why groups did not fuse, as warned
        self.on_progress = on_progress

    def resident_runs(self) -> tuple[str, ...]:
        return self.sessions.run_ids()

    def loaded_bases(self) -> tuple[str, ...]:
        return self.bases.keys()

    # ------------------------------------------------------------ the chunk step

    def train_chunk(self, run: PlannedRun, config: Any, chunk: int, resume_from: str | None,
                    max_eval_samples: int | None, evaluate: bool = True, judged: bool = False) -> ChunkOutcome:
        started, started_at = time.perf_counter(), time.time()
        session = self._session(run, config, chunk_boundary(run, chunk - 1), resume_from, max_eval_samples)
        self._place(run.run_id)
        base = self.evaluation.at_start(run, config, session, max_eval_samples)
        meter = session.on_step = self._meter(run, chunk)
        try:
            step_seconds = session.train_until(chunk_boundary(run, chunk))
        finally:
            session.on_step = None
            self._report_reward_failures(run.run_id, chunk)
        return self._end_chunk(run, config, session, chunk, evaluate, judged, started, started_at, step_seconds, meter.tokens,
                               base)

    def train_fused(self, members: list[FusedMember]) -> list[ChunkOutcome | Exception]:
        """Chunks of several runs trained as one fused group (`fused.FusedGroup`), each then evaluated and
        made durable as after `train_chunk`: per member its outcome, or the error that ended its chunk
        (its evaluation, say: the member fails alone). Runs that cannot fuse (`fused.fuse_problems`: say
        their adapters train new token rows) train their chunks one after another instead. Each member's
        step time is the group's (they trained at once). An error while the group trains is raised."""
        from finetune.train.fused import FusedGroup, fuse_problems

        started, started_at = time.perf_counter(), time.time()
        sessions = [self._session(m.run, m.config, chunk_boundary(m.run, m.chunk - 1), m.resume_from, m.max_eval_samples)
                    for m in members]
        problems = fuse_problems(sessions)
        if problems:
            if not set(problems) <= self.fuse_refusals:  # once per reason, not at every chunk
                logger.warning("experiment.fuse: these runs train one after another: %s", "; ".join(problems))
                self.fuse_refusals.update(problems)
            return [_outcome_or_error(lambda m=m: self.train_chunk(m.run, m.config, m.chunk, m.resume_from, m.max_eval_samples,
                                                                   m.evaluate, m.judged)) for m in members]
        for member in members:
            self._place(member.run.run_id)
        for session in sessions:  # every member trains now: all their state on the device
            if self.device.startswith("cuda"):
                session.move_state(self.device)
        bases = [self.evaluation.at_start(m.run, m.config, session, m.max_eval_samples) for m, session in zip(members, sessions)]
        meters = []
        for member, session in zip(members, sessions):
            meters.append(self._meter(member.run, member.chunk))
            session.on_step = meters[-1]
        try:
            step_seconds = FusedGroup(sessions).train_until({m.run.run_id: chunk_boundary(m.run, m.chunk) for m in members})
        finally:
            for session in sessions:
                session.on_step = None
        for member in members:
            self._report_reward_failures(member.run.run_id, member.chunk)
        return [_outcome_or_error(lambda m=m, session=session, base=base, meter=meter: self._end_chunk(
                    m.run, m.config, session, m.chunk, m.evaluate, m.judged, started, started_at, step_seconds, meter.tokens,
                    base))
                for m, session, base, meter in zip(members, sessions, bases, meters)]

    def _meter(self, run: PlannedRun, chunk: int) -> StepMeter:
        """What counts a chunk's tokens and reports its steps' progress."""
        end = chunk_boundary(run, chunk)
        return StepMeter(self.on_progress, run.run_id, chunk, chunk_boundary(run, chunk - 1), end,
                         run.derived.total_steps or end, self.device)

    def _end_chunk(self, run: PlannedRun, config: Any, session: RunSession, chunk: int, evaluate: bool, judged: bool,
                   started: float, started_at: float, step_seconds: float, tokens: int = 0,
                   base: tuple[tuple[KeptAnswer, ...], float] = ((), 0.0)) -> ChunkOutcome:
        """A trained chunk's evaluation, its snapshot handed to the background writer, and its outcome (`base`:
        the answers and seconds of the evaluation before the run's first step, `BenchEvaluation.at_start`)."""
        answers, eval_seconds = base
        eval_started = time.perf_counter()
        metrics, kept = self.evaluation.measure(run, config, session, chunk, evaluate, judged)
        eval_seconds += time.perf_counter() - eval_started
        final = chunk == len(run.derived.chunk_steps or []) - 1
        target = self.root / "runs" / run.run_id / f"chunk-{chunk}"
        state = session.snapshot(target, final)  # in a gang, every rank takes part; rank 0 gets the state and writes it
        if isinstance(state, ShardedState):
            self._publish_shards(run, config, session, state, chunk, target, final)
        elif state is not None:
            self._write_durably(run, config, session, state, chunk, target, final)
        if final:
            self.close(run.run_id, wait=False)
        peak, total = _memory(self.device)
        return ChunkOutcome(run.run_id, chunk, session.step, str(target), metrics, final, step_seconds, eval_seconds,
                            time.perf_counter() - started, started_at, time.time(), peak, total, tokens, answers + kept)

    def _report_reward_failures(self, run_id: str, chunk: int) -> None:
        """A user reward function that failed while the chunk trained: a warning each (the run goes on)."""
        from finetune.train.rewards import FENCE

        for failure in FENCE.take_failures():
            self.on_warning(run_id, chunk, failure)

    def _write_durably(self, run: PlannedRun, config: Any, session: RunSession, state: RunState, chunk: int,
                       target: Path, final: bool) -> None:
        adapter_config = self._adapter_config(session)

        def write() -> None:
            write_run_state(target, state, adapter_config)

        self._submit(run, config, session, write, state.trainable if final else None, chunk, target)

    def _publish_shards(self, run: PlannedRun, config: Any, session: RunSession, state: ShardedState, chunk: int,
                        target: Path, final: bool) -> None:
        """Once every rank's shard is on disk, rank 0 adds the run's small state and renames the directory
        into place; another rank's job only waits for its shard (so closing the run waits for it too)."""
        def write() -> None:
            publish_shards(state, target)

        if not self.strategy.writes_files:
            self.writer.submit(WriteJob(run.run_id, write, lambda result: None, lambda error: None))
            return
        self._submit(run, config, session, write, state.final_weights if final else None, chunk, target)

    def _submit(self, run: PlannedRun, config: Any, session: RunSession, write_chunk: Callable[[], None],
                final_weights: dict[str, Any] | None, chunk: int, target: Path) -> None:
        """Hand the chunk's writing to the background writer; `final_weights`: also the final model."""
        adapter_config = self._adapter_config(session)
        base = self._base_of(run.run_id)
        full_model = session.model if session.adapter_name is None else None

        def write() -> str | None:
            write_chunk()
            if final_weights is None:
                return None
            from finetune.train.export import write_final

            return str(write_final(config, run.run_id, self.root, final_weights, adapter_config, base, full_model))

        def done(final_checkpoint: str | None) -> None:
            self.on_durable(run.run_id, chunk, str(target), final_checkpoint)

        def failed(error: BaseException) -> None:
            self.on_write_failed(run.run_id, chunk, f"{type(error).__name__}: {error}")

        self.writer.submit(WriteJob(run.run_id, write, done, failed))

    def _adapter_config(self, session: RunSession) -> Any | None:
        if session.adapter_name is None:
            return None
        base = self._base_of(session.run_id)
        adapter_config = copy.copy(session.model.peft_config[session.adapter_name])
        adapter_config.base_model_name_or_path = str(base.saved_as) if base.saved_as else adapter_config.base_model_name_or_path
        return adapter_config

    # ------------------------------------------------------------ sessions

    def _base_of(self, run_id: str) -> LoadedBase:
        base = self.bases.get(self.sessions.base_of[run_id])
        assert base is not None, f"run {run_id} is resident on a base that was evicted"
        return base

    def _session(self, run: PlannedRun, config: Any, start_step: int, resume_from: str | None,
                 max_eval_samples: int | None) -> RunSession:
        session = self.sessions.touch(run.run_id)
        if session is not None and session.step == start_step:
            return session
        if session is not None:
            self.close(run.run_id)  # stale: the run went on elsewhere
        for other in self.strategy.make_room(self.sessions):
            self.close(other)
        session = self._open(run, config, max_eval_samples)
        if resume_from:
            # A run's chunk 0 has no durable chunk of its own: what it is given is where it starts from.
            resume_session(session, resume_from, initial=start_step == 0)
        if session.step != start_step:
            raise RuntimeError(f"run {run.run_id} is at step {session.step}, its chunk starts at step {start_step}: "
                               "its durable checkpoint is missing")
        return session

    def _open(self, run: PlannedRun, config: Any, max_eval_samples: int | None) -> RunSession:
        from finetune.train.trainer import build_trainer

        base = self.bases.acquire(config, evict=self._evict_base)
        data = self.bases.data(base, run.run_id, config)
        seed = int(config.training_args.seed if getattr(config.training_args, "seed", None) is not None else 42)
        model, adapter_name = self.strategy.make_model(base, config, run.run_id, seed, self.sessions)
        run_dir = mkdir_under(self.root, self.root / "runs" / run.run_id)
        callbacks = [_metrics_callback(run.run_id, self.sink)]
        trainer = build_trainer(config, run.derived, model, base.tokenizer, data.train, eval_subset(data.eval, max_eval_samples),
                                run_dir, self.device, callbacks, base.input_pad_id)
        remove_ghost(self.root, self.root_identity, run_dir)  # the Trainer makes its output_dir, wherever it went
        assert run.derived.total_steps is not None
        opened = (run.run_id, trainer, adapter_name, self.device, run.derived.total_steps)
        experiment = config.experiment
        session = (ShardedSession(*opened, strategy=experiment.distributed, cpu_offload=experiment.fsdp_cpu_offload)
                   if is_sharded(experiment.distributed) else RunSession(*opened))
        self.sessions.add(session, base.key)
        return session

    def _evict_base(self, key: str) -> None:
        for run_id in self.sessions.of_base(key):
            self.close(run_id)

    def close(self, run_id: str, wait: bool = True) -> None:
        """Forget a run's in-memory state (its durable checkpoint stays)."""
        if run_id in self.sessions:
            self.sessions.close(run_id, self.bases.get(self.sessions.base_of[run_id]), wait)

    def _place(self, active: str) -> None:
        """Bring the active run's state to the device; move or drop others to stay within budget."""
        offload, drop = self.strategy.placement(self.sessions, active, self.budgets)
        for run_id in drop:
            self.close(run_id)
        for run_id in offload:
            self.sessions[run_id].move_state("cpu")
        if self.device.startswith("cuda"):
            self.sessions[active].move_state(self.device)


def _outcome_or_error(chunk: Callable[[], ChunkOutcome]) -> ChunkOutcome | Exception:
    try:
        return chunk()
    except Exception as error:  # noqa: BLE001 - the member's own failure, reported for it alone
        error.__traceback_text__ = traceback.format_exc()  # type: ignore[attr-defined]
        return error


def _memory(device: str) -> tuple[int, int]:
    """(peak bytes allocated by this worker, the device's total bytes); zeros on the CPU."""
    if not device.startswith("cuda"):
        return 0, 0
    import torch

    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.get_device_properties(device).total_memory)


def _metrics_callback(run_id: str, sink: MetricsSink | None) -> Any:
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if sink is not None and logs:
                numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                sink(run_id, state.global_step, numbers)

    return _Forward()
