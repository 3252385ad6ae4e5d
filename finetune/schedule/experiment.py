"""`finetune run`: from a plan to a trained experiment, with a live table of runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.live import Live

from finetune.config.scheduling import ExperimentConfig
from finetune.config.validation import CONFIG_ADAPTER
from finetune.plan.model import RunPlan
from finetune.schedule.controller import Controller
from finetune.schedule.display import runs_table
from finetune.schedule.gang import gang_kind
from finetune.schedule.pool import SlotPool, WorkerPool, WorkerSettings, resolve_devices
from finetune.schedule.preparation import ExperimentError, experiment_dir, initial_checkpoint, load_or_create_plan
from finetune.schedule.store import StateStore
from finetune.schedule.tracking import Tracker

REDRAW_SECONDS = 0.5
TrackerFactory = Callable[[Path, RunPlan], Tracker]


class Throttled:
    """Calls `action` at most once every `seconds` (the live table is rebuilt from the store)."""

    def __init__(self, action: Callable[[], None], seconds: float) -> None:
        self.action, self.seconds, self.last = action, seconds, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            self.action()


def check_before_any_work(plan: RunPlan, devices: list[str] | None) -> dict[str, Any]:
    """Every problem of every run that can be known now, at once, before data, workers or MLflow
    (`devices` None: on a Ray cluster, whose devices the workers check). Returns the validated
    config of each run."""
    from finetune.train.model import load_tokenizer
    from finetune.train.preflight import preflight

    tokenizers: dict[str, Any] = {}

    def tokenizer_of(config: Any) -> Any:
        source = config.run_conf.tokenizer or config.run_conf.model
        if source not in tokenizers:
            tokenizers[source] = load_tokenizer(config)
        return tokenizers[source]

    lines, configs = [], {}
    for run in plan.runs:
        config = configs[run.run_id] = CONFIG_ADAPTER.validate_python(run.config)
        problems = preflight(config, devices, tokenizer_of)
        try:
            initial_checkpoint(config)
        except ExperimentError as error:
            problems.append(("run_conf.resume_from_checkpoint", str(error).partition(": ")[2]))
        lines += [f"run {run.run_id} ({run.label or 'the only run'}): {path}: {problem}" for path, problem in problems]
    if lines:
        raise ExperimentError(f"{len(lines)} problem(s) found before any work; nothing was started:\n" + "\n".join(lines))
    return configs


def start_pool(settings: ExperimentConfig, root: Path, kinds: set[str]) -> SlotPool:
    """Worker processes on this machine, or Ray actors (`experiment.backend: ray`); `kinds`: the kinds
    of workers the plan's runs need ("" one device, "ddp:2" a gang), started now so that their
    imports overlap the data preparation."""
    memory = WorkerSettings(settings.gpu_state_budget_gb, settings.cpu_state_budget_gb, settings.threads_per_worker)
    if settings.backend == "ray":
        from finetune.schedule.ray_pool import RayWorkerPool

        return RayWorkerPool(settings.devices, settings.runs_per_device, root.resolve(), settings.ray_address, memory)
    return WorkerPool(resolve_devices(settings.devices), settings.runs_per_device, root, memory, sorted(kinds))


def run_experiment(plan: RunPlan, console: Console, make_tracker: TrackerFactory, resume_dir: Path | None = None) -> Path:
    """Train the plan in its experiment directory (or continue the one in `resume_dir`)."""
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    root = resume_dir or experiment_dir(plan)
    started = time.perf_counter()
    settings = plan.settings
    local = settings.backend == "local"
    configs = check_before_any_work(plan, resolve_devices(settings.devices) if local else None)
    root.mkdir(parents=True, exist_ok=True)
    pool = start_pool(settings, root, {gang_kind(config.experiment) for config in configs.values()})
    devices = sorted({worker.device for worker in pool.workers})
    try:
        with console.status("preparing data (tokenised once per data setting)..."):
            plan = load_or_create_plan(plan, root, resume=resume_dir is not None)
        store = StateStore(root / "state.db")
        tracker = make_tracker(root, plan)
        title = f"{plan.experiment} on {', '.join(devices)}"
        with Live(runs_table(store, title), console=console, refresh_per_second=4, transient=False) as live:
            redraw = Throttled(lambda: live.update(runs_table(store, title)), REDRAW_SECONDS)
            controller = Controller(plan, root, store, tracker, pool, on_change=redraw)
            controller.start()
            controller.run()
            live.update(runs_table(store, f"{title}: done in {time.perf_counter() - started:.1f}s"))
        store.close()
    finally:
        pool.stop()
    return root
