"""A worker process: one per device. It keeps base models resident and trains (run, chunk) tasks.

The transport is a pair of multiprocessing queues of plain dicts; a Ray actor per GPU would
take the same messages (this is the seam for many machines).
"""

from __future__ import annotations

import os
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

MAX_RESIDENT_BASES = 2


def quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "torch", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def freeze_long_lived_objects() -> None:
    """Move every object alive now (libraries, resident models) out of the garbage collector's scans.

    Trainers call `gc.collect()` after each `train()`, once per chunk; without this each call
    rescans every object of torch, transformers and the loaded models.
    """
    import gc

    gc.collect()
    gc.freeze()


def worker_main(device: str, experiment_dir: str, tasks: Any, results: Any) -> None:
    """Serve tasks until a None arrives. Each task: {run, chunk, resume_from, max_eval_samples}.

    The ML stack is imported first, while the controller is still preparing the plan.
    """
    quiet_libraries()
    import peft  # noqa: F401
    import trl  # noqa: F401

    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.plan.model import PlannedRun
    from finetune.train.chunks import base_key, load_resident, train_chunk

    freeze_long_lived_objects()

    root = Path(experiment_dir)
    residents: OrderedDict[str, Any] = OrderedDict()
    configs: dict[str, Any] = {}
    while (task := tasks.get()) is not None:
        run = PlannedRun.model_validate(task["run"])
        try:
            if run.run_id not in configs:
                configs[run.run_id] = CONFIG_ADAPTER.validate_python(run.config)
            config = configs[run.run_id]
            key = base_key(config)
            if key not in residents:
                while len(residents) >= MAX_RESIDENT_BASES:
                    residents.popitem(last=False)
                residents[key] = load_resident(config, device)
                freeze_long_lived_objects()
            residents.move_to_end(key)

            def sink(run_id: str, step: int, metrics: dict[str, float]) -> None:
                results.put({"type": "metrics", "run_id": run_id, "step": step, "metrics": metrics})

            import time

            started = time.perf_counter()
            outcome = train_chunk(
                run, config, task["chunk"], task["resume_from"], residents[key], root / "runs" / run.run_id,
                root / "cache", device, task["max_eval_samples"], sink,
            )
            results.put({"type": "chunk_done", "device": device, "seconds": time.perf_counter() - started, **outcome.__dict__})
        except Exception as error:  # a bad run fails alone; the worker goes on
            results.put({"type": "failed", "device": device, "run_id": run.run_id, "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc()})
    results.put({"type": "worker_exit", "device": device})
