"""A worker process: one per device slot. It keeps runs resident and trains (run, chunk) tasks.

The transport is a pair of multiprocessing queues of plain dicts; a Ray actor per GPU would
take the same messages (this is the seam for many machines). Messages out: `metrics`,
`chunk_done` (trained and evaluated; the worker is free), `chunk_durable` (its checkpoint is on
disk), `failed`, `write_failed`, `worker_exit`.

A gang (k processes training one run) is k workers that receive the same tasks; rank 0 speaks for
it. A rank that fails reports `rank_error` and exits: its peers cannot go on without it, and the
controller ends and replaces the whole gang.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any


def worker_main(worker_id: str, device: str, experiment_dir: str, memory: dict[str, Any], tasks: Any, results: Any,
                gang: dict[str, Any] | None = None, isolate: bool = False) -> None:
    """Serve tasks until a None arrives. Each task: {run, chunk, resume_from, max_eval_samples, evaluate}.

    `memory`: the configured state budgets (gpu_gb, cpu_gb; None for the defaults) and how many
    workers share the device (gpu_share) and the machine (host_share). `gang`: this rank's place in
    a gang (`train.distributed.GangRank`). `isolate`: make the worker's GPUs the only ones it sees.
    The ML stack is imported first, while the controller is still preparing the plan.
    """
    from finetune.runtime import freeze_long_lived_objects, quiet_libraries
    from finetune.train.distributed import GangRank, join_gang, visible_device

    rank = GangRank.from_dict(gang) if gang else None
    if rank is not None:
        device = join_gang(rank, isolate)
    elif isolate:
        device = visible_device(device)
    quiet_libraries()
    import peft  # noqa: F401
    import trl  # noqa: F401

    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.plan.model import PlannedRun
    from finetune.train.residency import default_budgets
    from finetune.train.workbench import Workbench

    freeze_long_lived_objects()

    def sink(run_id: str, step: int, metrics: dict[str, float]) -> None:
        results.put({"type": "metrics", "run_id": run_id, "step": step, "metrics": metrics})

    def on_durable(message: dict[str, Any]) -> None:
        results.put({**message, "worker": worker_id})

    speaks = rank is None or rank.rank == 0
    budgets = default_budgets(device, memory["gpu_share"], memory["host_share"], memory["gpu_gb"], memory["cpu_gb"])
    bench = Workbench(Path(experiment_dir), device, budgets, sink=sink if speaks else None, on_durable=on_durable,
                      gang_rank=rank.rank if rank else None)
    configs: dict[str, Any] = {}
    while (task := tasks.get()) is not None:
        run = PlannedRun.model_validate(task["run"])
        try:
            if run.run_id not in configs:
                configs[run.run_id] = CONFIG_ADAPTER.validate_python(run.config)
            outcome = bench.train_chunk(run, configs[run.run_id], task["chunk"], task["resume_from"],
                                        task["max_eval_samples"], task.get("evaluate", True))
            if speaks:
                results.put({"type": "chunk_done", "worker": worker_id, **outcome.__dict__})
        except Exception as error:
            if rank is not None:
                _leave_gang(worker_id, rank.rank, run.run_id, error, results)
            bench.close(run.run_id)  # a bad run fails alone; the worker goes on
            results.put({"type": "failed", "worker": worker_id, "run_id": run.run_id,
                         "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
    bench.writer.close()
    results.put({"type": "worker_exit", "worker": worker_id})


def _leave_gang(worker_id: str, rank: int, run_id: str, error: Exception, results: Any) -> None:
    """Report why this rank stops, then exit: the gang's other ranks may be waiting for it."""
    import os

    results.put({"type": "rank_error", "worker": worker_id, "rank": rank, "run_id": run_id,
                 "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
    if hasattr(results, "close"):
        results.close()
        results.join_thread()  # the message is sent before the process ends
    os._exit(1)
