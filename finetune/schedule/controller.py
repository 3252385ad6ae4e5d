"""The controller: owns the plan, the policy and the state store; feeds (run, chunk) tasks to workers.

Kill it at any moment: `finetune run --resume` (or the same command again) continues every
run from its last durable chunk, since a chunk counts only once the store has recorded it.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finetune.config.validation import CONFIG_ADAPTER
from finetune.io import write_json_atomic
from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.policy import RunView, SuccessiveHalving, next_task
from finetune.schedule.store import StateStore

POLL_SECONDS = 0.2


class ExperimentError(RuntimeError):
    pass


def experiment_dir(plan: RunPlan) -> Path:
    return Path(plan.output_dir) / plan.experiment


def resolve_devices(setting: Any) -> list[str]:
    if setting == "cpu":
        return ["cpu"]
    import torch

    if setting == "auto":
        count = torch.cuda.device_count()
        return [f"cuda:{index}" for index in range(count)] or ["cpu"]
    return [f"cuda:{index}" for index in setting]


# ---------------------------------------------------------------- exact sizes before training


def finalize_plan(plan: RunPlan, root: Path) -> RunPlan:
    """Prepare (and cache) each data setting once, then derive steps and chunks from the real sizes."""
    from finetune.data.pipeline import prepare_data, prepare_tokenizer
    from finetune.plan.derive import derive
    from finetune.train.chunks import base_key
    from finetune.train.model import load_tokenizer

    tokenizers: dict[str, Any] = {}
    runs = []
    failed: dict[str, str] = {}
    for run in plan.runs:
        config = CONFIG_ADAPTER.validate_python(run.config)
        key = base_key(config)
        try:
            if key not in tokenizers:
                tokenizer = load_tokenizer(config)
                prepare_tokenizer(tokenizer, config.data_conf)
                tokenizers[key] = tokenizer
            stats = prepare_data(config, tokenizers[key], root / "cache").stats
            run = run.model_copy(update={"derived": derive(config, stats.train_examples, run.derived.num_processes)})
        except Exception as error:  # a run whose model or data cannot be prepared fails alone
            failed[run.run_id] = f"{type(error).__name__}: {error}"
        runs.append(run)
    return plan.model_copy(update={"runs": runs, "failed": failed})


def initial_checkpoint(config: Any) -> str | None:
    """`run_conf.resume_from_checkpoint` as a path: the HF checkpoint a run's first chunk starts from.

    `auto`, true and false need nothing here: every run always continues from its last durable chunk.
    """
    value = config.run_conf.resume_from_checkpoint
    if not isinstance(value, str) or value.lower() in ("auto", "true", "false"):
        return None
    if not (Path(value) / "trainer_state.json").is_file():
        raise ExperimentError(f"run_conf.resume_from_checkpoint: {value} is not a training checkpoint (no trainer_state.json)")
    return value


def load_or_create_plan(plan: RunPlan, root: Path, resume: bool) -> RunPlan:
    saved = root / "plan.json"
    if saved.is_file():
        existing = RunPlan.model_validate_json(saved.read_text())
        original = {run.run_id for run in existing.runs if run.parent_run_id is None}
        if resume or original == {run.run_id for run in plan.runs}:
            return existing
        raise ExperimentError(
            f"{root} already holds an experiment with other runs; use --resume to continue it, "
            "or give experiment.name another value"
        )
    if resume:
        raise ExperimentError(f"nothing to resume: {saved} does not exist")
    final = finalize_plan(plan, root)
    write_json_atomic(saved, final.model_dump(mode="json"))
    return final


# ---------------------------------------------------------------- the controller


@dataclass
class WorkerHandle:
    device: str
    process: Any
    tasks: Any
    busy_with: str | None = None
    resident_keys: set[str] = field(default_factory=set)


class WorkerPool:
    """One worker process per device, started early so that their imports overlap the controller's set-up."""

    def __init__(self, devices: list[str], root: Path) -> None:
        self.root = root
        self.context = multiprocessing.get_context("spawn")
        self.results = self.context.Queue()
        self.workers = [self.spawn(device) for device in devices]

    def spawn(self, device: str) -> WorkerHandle:
        from finetune.schedule.worker import worker_main

        tasks = self.context.Queue()
        process = self.context.Process(target=worker_main, args=(device, str(self.root), tasks, self.results), daemon=True)
        process.start()
        return WorkerHandle(device, process, tasks)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.tasks.put(None)
        for worker in self.workers:
            worker.process.join(timeout=30)
            if worker.process.is_alive():
                worker.process.terminate()


@dataclass
class Controller:
    plan: RunPlan
    root: Path
    store: StateStore
    tracker: Any
    pool: WorkerPool
    on_change: Callable[[], None] = lambda: None
    sha: dict[int, SuccessiveHalving] = field(default_factory=dict)
    base_keys: dict[str, str] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)
    parent_mlflow_id: str | None = None

    # ------------------------------------------------------------ set-up

    @property
    def workers(self) -> list[WorkerHandle]:
        return self.pool.workers

    @property
    def results(self) -> Any:
        return self.pool.results

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
        from finetune.train.chunks import base_key

        self.store.add_run(run.run_id, run.label, len(run.derived.chunk_steps or []), run.parent_run_id)
        self.configs[run.run_id] = CONFIG_ADAPTER.validate_python(run.config)
        self.base_keys[run.run_id] = base_key(self.configs[run.run_id])

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
            if not any(worker.busy_with for worker in self.workers) and self._nothing_left():
                break
            self._drain(block=True)
            self._check_workers()
        self._finish_tracking()

    def _views(self) -> list[RunView]:
        views = []
        for row in self.store.runs():
            run = self._planned(row.run_id)
            if run is None:
                continue
            runnable = row.state in ("pending", "running")
            views.append(RunView(row.run_id, row.position, row.chunks_done, row.total_chunks, runnable, self.base_keys.get(row.run_id, ""), run.group))
        return views

    def _nothing_left(self) -> bool:
        return next_task(self._views(), set(), set()) is None

    def busy(self, run_id: str) -> bool:
        return any(worker.busy_with == run_id for worker in self.workers)

    def add_run(self, run: PlannedRun) -> None:
        self.plan = self.plan.model_copy(update={"runs": [*self.plan.runs, run]})
        write_json_atomic(self.root / "plan.json", self.plan.model_dump(mode="json"))
        self._register(run)
        if self.parent_mlflow_id:
            self.store.set_mlflow_run(run.run_id, self.tracker.child_run(self.parent_mlflow_id, run))

    def _dispatch(self) -> None:
        busy = {worker.busy_with for worker in self.workers if worker.busy_with}
        for worker in self.workers:
            if worker.busy_with:
                continue
            task = next_task(self._views(), busy, worker.resident_keys)
            if task is None:
                return
            run = self._planned(task.run_id)
            assert run is not None
            row = self.store.run(task.run_id)
            config = self.configs[task.run_id]
            worker.tasks.put(
                {"run": run.model_dump(mode="json"), "chunk": task.chunk,
                 "resume_from": row.last_checkpoint or initial_checkpoint(config),
                 "max_eval_samples": config.experiment.max_eval_samples}
            )
            worker.busy_with = task.run_id
            worker.resident_keys.add(self.base_keys[task.run_id])
            busy.add(task.run_id)
            self.store.set_state(task.run_id, "running")
            self.store.event("chunk_started", task.run_id, chunk=task.chunk, device=worker.device)
            self.on_change()

    def _drain(self, block: bool) -> None:
        try:
            message = self.results.get(timeout=POLL_SECONDS if block else 0)
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self.results.get_nowait()
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
        elif kind == "failed":
            self._release(message["device"])
            self.store.set_state(message["run_id"], "failed", message["error"])
            self.store.event("run_failed", message["run_id"], error=message["error"], traceback=message["traceback"])
            self._end_mlflow(message["run_id"], "FAILED")
        self.on_change()

    def _chunk_done(self, message: dict[str, Any]) -> None:
        run_id, chunk = message["run_id"], message["chunk"]
        previous = self.store.run(run_id).last_checkpoint
        self.store.record_chunk(
            run_id, chunk, message["global_step"], message["checkpoint"], message["metrics"], message["seconds"], message["step_seconds"]
        )
        self._release(message["device"])
        self.store.event("chunk_done", run_id, chunk=chunk, step=message["global_step"], metrics=message["metrics"], seconds=message["seconds"])
        if previous and previous != message["checkpoint"]:
            shutil.rmtree(previous, ignore_errors=True)
        row = self.store.run(run_id)
        if row.state == "running":
            self.store.set_state(run_id, "pending")
        if row.chunks_done >= row.total_chunks:
            self.store.set_state(run_id, "completed")
            self.store.event("run_completed", run_id, final_checkpoint=message.get("final_checkpoint"))
            self._end_mlflow(run_id, "FINISHED", message.get("final_checkpoint"))
            return
        run = self._planned(run_id)
        policy = self.sha.get(run.group) if run else None
        if policy is not None and row.state in ("pending", "running"):
            decision, detail = policy.on_result(run_id, row.chunks_done, message["metrics"])
            if detail:
                self.store.event(f"sha_{decision}", run_id, **detail)
            if decision == "stop":
                self.store.set_state(run_id, "stopped")
                self._end_mlflow(run_id, "KILLED")

    def _release(self, device: str) -> None:
        for worker in self.workers:
            if worker.device == device:
                worker.busy_with = None

    def _end_mlflow(self, run_id: str, status: str, final_checkpoint: str | None = None) -> None:
        row = self.store.run(run_id)
        if row.mlflow_run_id:
            run = self._planned(run_id)
            if final_checkpoint and run is not None:
                tracking = self.configs[run_id].tracking
                if tracking is not None and tracking.log_artifacts:
                    self.tracker.log_artifacts(row.mlflow_run_id, final_checkpoint)
            self.tracker.finish(row.mlflow_run_id, status)

    def _check_workers(self) -> None:
        for index, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            if worker.busy_with:
                error = f"the worker on {worker.device} died (exit code {worker.process.exitcode}), e.g. out of memory"
                self.store.set_state(worker.busy_with, "failed", error)
                self.store.event("run_failed", worker.busy_with, error=error)
                self._end_mlflow(worker.busy_with, "FAILED")
            self.workers[index] = self.pool.spawn(worker.device)

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
