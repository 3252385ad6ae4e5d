"""Durable checkpoints: a run's state written atomically, off the training path.

A chunk checkpoint is a directory `chunk-<k>` holding the trained weights (for an adapter, PEFT's
own `adapter_config.json` + `adapter_model.safetensors`, so it is also a warm start), the optimizer
moments and `state.pt` (LR schedule, RNG, data position, step), and `reference.pt` when
`sync_ref_model` moves the reference model. It is written into a temporary
directory and renamed, by a background thread, from a CPU copy taken at the chunk boundary.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from finetune.io import mkdir_under
from finetune.train.data_order import DataPosition
from finetune.train.session import RunState

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"
REFERENCE_WEIGHTS = "reference.pt"  # a DPO/GRPO reference model that sync_ref_model moves


def _tmp_dir(target: Path) -> Path:
    """A fresh temporary directory beside `target` (runs/<run>/chunk-N). The experiment folder itself must still
    be there: one moved away while it trains is not created again, empty, at its old path."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return mkdir_under(target.parent.parent.parent, tmp)



def publish(tmp: Path, target: Path) -> None:
    """Rename a fully written directory into place (replacing an older one of the same name)."""
    for path in tmp.iterdir():
        with open(path, "rb") as stream:
            os.fsync(stream.fileno())
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def save_weights(directory: Path, trainable: dict[str, Any], adapter_config: Any | None) -> None:
    """Weights in the format their library loads: PEFT's adapter files, or one safetensors file."""
    from safetensors.torch import save_file

    tensors = {name: tensor.contiguous() for name, tensor in trainable.items()}
    if adapter_config is not None:
        adapter_config.save_pretrained(str(directory))
        save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    else:
        save_file(tensors, directory / FULL_WEIGHTS, metadata={"format": "pt"})


def write_run_state(target: Path, state: RunState, adapter_config: Any | None) -> Path:
    import torch

    tmp = _tmp_dir(target)
    try:
        save_weights(tmp, state.trainable, adapter_config)
        torch.save(state.optimizer, tmp / "optimizer.pt")
        extra = {"step": state.step, "position": [state.position.epoch, state.position.batch], "scheduler": state.scheduler,
                 "rng": state.rng, "counters": state.counters}
        torch.save(extra, tmp / "state.pt")
        if state.reference is not None:
            torch.save(state.reference, tmp / REFERENCE_WEIGHTS)
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk, say: nothing half-written is left behind
        raise
    return target


def read_run_state(directory: str | Path) -> RunState:
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS if (directory / ADAPTER_WEIGHTS).is_file() else directory / FULL_WEIGHTS
    extra = torch.load(directory / "state.pt", weights_only=False)  # written by this tool
    return RunState(
        step=int(extra["step"]),
        position=DataPosition(*extra["position"]),
        trainable=load_file(weights),
        optimizer=torch.load(directory / "optimizer.pt", weights_only=False),
        scheduler=extra["scheduler"],
        rng=extra["rng"],
        counters=extra["counters"],
        reference=torch.load(directory / REFERENCE_WEIGHTS) if (directory / REFERENCE_WEIGHTS).is_file() else None,
    )


@contextmanager
def own_hyperparameters(optimizer: Any) -> Iterator[None]:
    """Around loading another run's optimizer state into a new run: its moments are kept, and the
    new run's own settings (learning rate, betas, weight decay) are put back after."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    settings = [{key: value for key, value in group.items() if key != "params"} for group in inner.param_groups]
    yield
    for group, own in zip(inner.param_groups, settings):
        group.update(own)


# ---------------------------------------------------------------- the background writer


@dataclass
class WriteJob:
    run_id: str
    action: Callable[[], Any]
    done: Callable[[Any], None]
    failed: Callable[[BaseException], None]


class DurableWriter:
    """One thread that performs write jobs in order; a run's chunks become durable in chunk order."""

    def __init__(self, max_pending: int = 4) -> None:
        self.jobs: queue.Queue[WriteJob | None] = queue.Queue(maxsize=max_pending)
        self.pending: dict[str, int] = {}
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._serve, name="durable-writer", daemon=True)
        self.thread.start()

    def submit(self, job: WriteJob) -> None:
        with self.lock:
            self.pending[job.run_id] = self.pending.get(job.run_id, 0) + 1
        self.jobs.put(job)

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                result = job.action()
            except BaseException as error:  # reported to the controller as the run's failure
                job.failed(error)
            else:
                job.done(result)
            with self.lock:
                self.pending[job.run_id] -= 1
                self.lock.notify_all()

    def wait_for(self, run_id: str | None = None) -> None:
        """Block until the run's writes (or all writes) are on disk."""
        with self.lock:
            self.lock.wait_for(lambda: all(count == 0 for rid, count in self.pending.items() if run_id in (None, rid)))

    def close(self) -> None:
        self.wait_for()
        self.jobs.put(None)
        self.thread.join()
