"""A worker process: one per device slot. It keeps runs resident and trains (run, chunk) tasks.

Tasks arrive as `ChunkTask` values on the worker's own queue (None: stop); what it reports goes to
the pool's result queue as the typed messages of `schedule.messages`. A Ray actor runs the same
loop over Ray queues (this is the seam for many machines).

A gang (k processes training one run) is k workers that receive the same tasks; rank 0 speaks for
it. A rank that fails reports `RankError` and exits: its peers cannot go on without it, and the
controller ends and replaces the whole gang.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from finetune.schedule.messages import (
    ChunkDone,
    ChunkDurable,
    ChunkTask,
    FusedTask,
    MetricsLogged,
    RankError,
    RunFailed,
    StepProgress,
    UserCodeWarning,
    WorkerExit,
    WorkerResources,
    WriteFailed,
)


def worker_main(worker_id: str, device: str, experiment_dir: str, resources: WorkerResources, tasks: Any, results: Any,
                gang: dict[str, Any] | None = None, isolate: bool = False, parent_pid: int | None = None,
                incarnation: int = 0) -> None:
    """Serve `ChunkTask`s until a None arrives.

    `resources`: state budgets, how many workers share the device and the machine, torch threads.
    `gang`: this rank's place in a gang (`train.distributed.GangRank`). `isolate`: make the worker's
    GPUs the only ones it sees. `parent_pid`: the controller's process; the worker exits when it is
    gone (killed, even with SIGKILL) rather than hold its memory and GPU for ever. The ML stack is
    imported first, while the controller is still preparing the plan.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the controller's: it stops the workers
    if parent_pid is not None:
        _exit_with(parent_pid)
    from finetune.runtime import freeze_long_lived_objects, quiet_libraries
    from finetune.train.distributed import GangRank, join_gang, visible_device

    rank = GangRank.from_dict(gang) if gang else None
    if rank is not None:
        device = join_gang(rank, isolate)
    elif isolate:
        device = visible_device(device)
    import torch

    from finetune.schedule.pool import host_cores

    torch.set_num_threads(resources.torch_threads(host_cores()))  # the workers on one machine split its cores
    quiet_libraries()
    import peft  # noqa: F401
    import trl  # noqa: F401

    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.train.residency import default_budgets
    from finetune.train.workbench import Workbench

    freeze_long_lived_objects()

    current = {"ticket": -1}  # the task being trained
    fused_tickets: dict[str, int] = {}  # in a fused group: each member's ticket

    def sink(run_id: str, step: int, metrics: dict[str, float]) -> None:
        results.put(MetricsLogged(worker_id, run_id, step, metrics, fused_tickets.get(run_id, current["ticket"]), incarnation))

    tickets: dict[tuple[str, int], int] = {}  # the ticket of each chunk whose checkpoint is being written

    def on_durable(run_id: str, chunk: int, checkpoint: str, final_checkpoint: str | None) -> None:
        results.put(ChunkDurable(worker_id, tickets.pop((run_id, chunk), -1), run_id, chunk, checkpoint, final_checkpoint,
                                 incarnation))

    def on_write_failed(run_id: str, chunk: int, error: str) -> None:
        results.put(WriteFailed(worker_id, run_id, chunk, error, tickets.pop((run_id, chunk), -1), incarnation))

    def on_warning(run_id: str, chunk: int, failure: Any) -> None:
        results.put(UserCodeWarning(worker_id, run_id, chunk, failure.source, failure.name, failure.function, failure.problem,
                                    incarnation))

    def on_progress(report: Any) -> None:
        results.put(StepProgress(worker_id, report, incarnation))

    speaks = rank is None or rank.rank == 0
    budgets = default_budgets(device, resources.gpu_share, resources.host_share, resources.gpu_gb, resources.cpu_gb)
    bench = Workbench(Path(experiment_dir), device, budgets, sink=sink if speaks else None, on_durable=on_durable,
                      on_write_failed=on_write_failed, gang_rank=rank.rank if rank else None,
                      on_warning=on_warning if speaks else None, on_progress=on_progress if speaks else None)
    configs: dict[str, Any] = {}
    task: ChunkTask | FusedTask | None
    while (task := tasks.get()) is not None:
        if isinstance(task, FusedTask):
            fused_tickets.update({member.run.run_id: member.ticket for member in task.tasks})
            _train_fused(worker_id, bench, task, configs, tickets, results, incarnation)
            fused_tickets.clear()
            continue
        run = task.run
        current["ticket"] = task.ticket
        if speaks:  # only the speaking rank writes checkpoints
            tickets[(run.run_id, task.chunk)] = task.ticket
        try:
            if run.run_id not in configs:
                configs[run.run_id] = CONFIG_ADAPTER.validate_python(run.config)
            outcome = bench.train_chunk(run, configs[run.run_id], task.chunk, task.resume_from, task.max_eval_samples, task.evaluate,
                                       task.judged)
            if speaks:
                results.put(_done(worker_id, task, outcome, bench, incarnation))
        except BaseException as error:  # torch's CheckpointException is a BaseException: the run's failure too
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            if rank is not None:
                _leave_gang(worker_id, rank.rank, run.run_id, error, results, incarnation)
            tickets.pop((run.run_id, task.chunk), None)
            bench.close(run.run_id)  # a bad run fails alone; the worker goes on
            results.put(RunFailed(worker_id, run.run_id, f"{type(error).__name__}: {error}", traceback.format_exc(), task.ticket,
                                  incarnation))
    bench.writer.close()
    bench.evaluation.generation.close()
    from finetune.train.rewards import FENCE

    FENCE.close()
    results.put(WorkerExit(worker_id, bench.resident_runs(), incarnation))


def _train_fused(worker_id: str, bench: Any, fused: FusedTask, configs: dict[str, Any], tickets: dict[tuple[str, int], int],
                 results: Any, incarnation: int) -> None:
    """A fused group's chunks (`experiment.fuse`), reported member by member as if trained alone. If the
    group fails, its members' sessions are dropped and each chunk is trained alone from the member's last
    durable checkpoint, so that a bad run fails alone."""
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.train.workbench import FusedMember

    members = []
    for task in fused.tasks:
        tickets[(task.run.run_id, task.chunk)] = task.ticket
        if task.run.run_id not in configs:
            configs[task.run.run_id] = CONFIG_ADAPTER.validate_python(task.run.config)
        members.append(FusedMember(task.run, configs[task.run.run_id], task.chunk, task.resume_from, task.max_eval_samples,
                                   task.evaluate, task.judged))
    try:
        outcomes = bench.train_fused(members)
    except Exception:
        for task in fused.tasks:
            bench.close(task.run.run_id)
        for task in fused.tasks:
            _train_alone(worker_id, bench, task, configs[task.run.run_id], tickets, results, incarnation)
        return
    for task, outcome in zip(fused.tasks, outcomes):
        if isinstance(outcome, Exception):
            tickets.pop((task.run.run_id, task.chunk), None)
            bench.close(task.run.run_id)
            results.put(RunFailed(worker_id, task.run.run_id, f"{type(outcome).__name__}: {outcome}",
                                  getattr(outcome, "__traceback_text__", ""), task.ticket, incarnation))
        else:
            results.put(_done(worker_id, task, outcome, bench, incarnation))


def _train_alone(worker_id: str, bench: Any, task: ChunkTask, config: Any, tickets: dict[tuple[str, int], int],
                 results: Any, incarnation: int) -> None:
    try:
        outcome = bench.train_chunk(task.run, config, task.chunk, task.resume_from, task.max_eval_samples, task.evaluate,
                                    task.judged)
        results.put(_done(worker_id, task, outcome, bench, incarnation))
    except Exception as error:
        tickets.pop((task.run.run_id, task.chunk), None)
        bench.close(task.run.run_id)
        results.put(RunFailed(worker_id, task.run.run_id, f"{type(error).__name__}: {error}", traceback.format_exc(),
                              task.ticket, incarnation))


def _done(worker_id: str, task: ChunkTask, outcome: Any, bench: Any, incarnation: int) -> ChunkDone:
    """A trained chunk's report (`workbench.ChunkOutcome`), whichever way it was trained (alone or fused)."""
    return ChunkDone(
        worker_id, task.ticket, task.run.run_id, outcome.chunk, outcome.global_step, outcome.metrics, outcome.seconds,
        outcome.step_seconds, outcome.eval_seconds, outcome.started_at, outcome.finished_at,
        outcome.peak_memory, outcome.total_memory, bench.resident_runs(), bench.loaded_bases(), incarnation,
        tokens=outcome.tokens, answers=outcome.answers,
    )


def _exit_with(parent_pid: int, every_seconds: float = 1.0) -> None:
    """End this process once its parent has ended (it is then adopted by another process)."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-controller", daemon=True).start()


def _leave_gang(worker_id: str, rank: int, run_id: str, error: BaseException, results: Any, incarnation: int = 0) -> None:
    """Report why this rank stops, then exit: the gang's other ranks may be waiting for it."""
    import os

    results.put(RankError(worker_id, rank, run_id, f"{type(error).__name__}: {error}", traceback.format_exc(), incarnation))
    if hasattr(results, "close"):
        results.close()
        results.join_thread()  # the message is sent before the process ends
    os._exit(1)
