"""`finetune run`: from a plan to a trained experiment, with a live table of runs."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.live import Live

from finetune.config.scheduling import ExperimentConfig
from finetune.plan.model import RunPlan
from finetune.schedule.controller import Controller
from finetune.schedule.interrupts import Interrupted, Interrupts, catching_signals, interrupted_message, resume_summary
from finetune.schedule.faults import read_only
from finetune.schedule.folder import CACHE_DIR, LOCK_FILE, STATE_FILE, ExperimentLock, controller_alive
from finetune.schedule.gang import gang_kind
from finetune.schedule.pool import SlotPool, WorkerPool, WorkerSettings, resolve_devices
from finetune.schedule.preparation import ExperimentError, experiment_dir, load_or_create_plan, start_up_problems
from finetune.schedule.progress import PlainLog, Throttled, progress_view
from finetune.schedule.store import StateStore
from finetune.schedule.tracking import Tracker

REDRAW_SECONDS = 0.5
TrackerFactory = Callable[[Path, RunPlan], Tracker]


def check_before_any_work(plan: RunPlan, devices: list[str] | None) -> dict[str, Any]:
    """Every problem of every run that can be known now, at once, before the experiment folder, data
    preparation, workers or MLflow (`devices` None: on a Ray cluster, whose devices the workers check),
    and of each search space's representative config: its model and tokenizer can be had, its data
    files read as records and the chat template applies to their first ones. Returns the validated
    config of each, by run id or `group N`."""
    from finetune.data.readers import read_records
    from finetune.plan.resources import plan_configs
    from finetune.train.model import load_tokenizer

    tokenizers: dict[str, Any] = {}
    records: dict[tuple[str, str, str], Any] = {}

    def tokenizer_of(config: Any) -> Any:
        source = config.run_conf.tokenizer or config.run_conf.model
        if source not in tokenizers:
            tokenizers[source] = load_tokenizer(config)
        return copy.deepcopy(tokenizers[source])  # the template check prepares it: the next run gets it untouched

    def records_of(path: str, method: str, data_format: str) -> Any:
        key = (path, method, data_format)
        if key not in records:
            try:
                records[key] = read_records(path, method, data_format)
            except Exception as error:
                records[key] = error
        found = records[key]
        if isinstance(found, Exception):
            raise found
        return found

    said: dict[tuple[str, str], list[str]] = {}
    configs = {}
    for key, (name, config) in plan_configs(plan).items():
        configs[key] = config
        for problem in start_up_problems(config, devices, tokenizer_of, records_of):
            said.setdefault(problem, []).append(name if len(plan.runs) > 1 or plan.search_spaces else "")
    lines = []
    for (path, problem), names in said.items():
        whose = "" if not any(names) else " (every run)" if len(names) == len(configs) > 1 else f" ({'; '.join(names)})"
        lines.append(f"{path}: {problem}{whose}")
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

        return RayWorkerPool(settings.devices, settings.runs_per_device, root, settings.ray_address, memory)
    return WorkerPool(resolve_devices(settings.devices), settings.runs_per_device, root, memory, sorted(kinds))


def run_experiment(plan: RunPlan, console: Console, make_tracker: TrackerFactory, resume_dir: Path | None = None) -> Path:
    """Train the plan in its experiment directory (or continue the one in `resume_dir`), holding the
    folder's lock throughout: a second controller on the same folder stops at once, saying who holds it.
    Ctrl-C or SIGTERM: `Interrupted`, whose message says what was saved and how to resume."""
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    root = (resume_dir or experiment_dir(plan)).resolve()
    interrupts = Interrupts()
    with catching_signals(interrupts):
        try:
            return _start(plan, root, console, make_tracker, resume_dir, interrupts)
        except Interrupted as interrupted:
            raise Interrupted(interrupted.signum, interrupted_message(interrupted.signum, root, _runs_of(root))) from None


def _start(plan: RunPlan, root: Path, console: Console, make_tracker: TrackerFactory, resume_dir: Path | None,
           interrupts: Interrupts) -> Path:
    settings = plan.settings
    if controller_alive(root):  # say who holds it, before any check (raises; released at once if it was let go)
        with ExperimentLock(root):
            pass
    if resume_dir is not None and root.is_dir() and not os.access(root, os.W_OK):  # said before the slower checks
        raise read_only(root, "training (`finetune run --resume`)")
    configs = check_before_any_work(plan, resolve_devices(settings.devices) if settings.backend == "local" else None)
    created = make_folder(root)
    try:
        with ExperimentLock(root):
            if resume_dir is None and never_trained(root):
                console.print(f"note: {root} holds an experiment that never trained a chunk (its start failed): "
                              "starting it afresh", highlight=False, soft_wrap=True)
                clear_folder(root)
            return _train(plan, root, console, make_tracker, resume_dir is not None, configs, interrupts)
    finally:
        # stopped before any work (no plan saved): nothing in the folder this run made is worth keeping
        if created and root.is_dir() and {path.name for path in root.iterdir()} <= {LOCK_FILE, CACHE_DIR}:
            shutil.rmtree(root, ignore_errors=True)


def _runs_of(root: Path) -> list[Any] | None:
    if not (root / STATE_FILE).is_file():
        return None
    try:
        store = StateStore(root / STATE_FILE, create=False)
    except Exception:
        return None
    try:
        return store.runs()
    finally:
        store.close()


def never_trained(root: Path) -> bool:
    """Whether `root` holds an experiment (a plan or a state store) without a single durable chunk: what a
    start that failed leaves, which a corrected rerun replaces rather than refuses or resumes."""
    if not (root / STATE_FILE).is_file():
        return (root / "plan.json").is_file()
    store = StateStore(root / STATE_FILE, create=False)
    try:
        return not store.chunk_rows()
    finally:
        store.close()


def clear_folder(root: Path) -> None:
    """Everything in the experiment folder but the lock this controller holds."""
    for entry in root.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def make_folder(root: Path) -> bool:
    """Create the experiment folder; True if it is new."""
    for parent in (root, *root.parents):
        if parent.exists() and not parent.is_dir():
            raise ExperimentError(f"{parent} is a file; the experiment folder {root} cannot be made under it "
                                  "(give experiment.output_dir another value)")
    if root.is_dir():
        return False
    try:
        root.mkdir(parents=True)
    except OSError as error:
        raise ExperimentError(f"cannot create the experiment folder {root}: {error.strerror or error}") from None
    return True


def _train(plan: RunPlan, root: Path, console: Console, make_tracker: TrackerFactory, resume: bool,
           configs: dict[str, Any], interrupts: Interrupts) -> Path:
    started = time.perf_counter()
    settings = plan.settings
    pool = start_pool(settings, root, {gang_kind(config.experiment) for config in configs.values()})
    devices = sorted({worker.device for worker in pool.workers})
    try:
        with console.status("preparing data (tokenised once per data setting)..."):
            plan = load_or_create_plan(plan, root, resume=resume)
        store = StateStore(root / STATE_FILE, create=True)
        if resume and store.runs():
            console.print(f"resuming {root}: {resume_summary(store.runs())}", highlight=False, soft_wrap=True)
        tracker = make_tracker(root, plan)
        title = f"{plan.experiment} on {', '.join(devices)}"
        controller = Controller(plan, root, store, tracker, pool)
        controller.start()
        view = progress_view(console, store, title)
        redraw = Throttled(view.refresh, REDRAW_SECONDS)
        controller.on_change, controller.on_progress = redraw, view.on_progress
        live = Live(console=console, refresh_per_second=4, get_renderable=view.renderable) if view.renderable() else None
        with live or contextlib.nullcontext():
            interrupts.winding_down = True
            controller.winding_down = interrupts.requested  # a signal whose exception was swallowed (a finalizer)
            abandoned = _loop(controller, interrupts)
            redraw.flush()
        if interrupts.requested:
            controller.tracking.finish("KILLED")
            if abandoned:
                pool.abandon()
            runs = store.runs()
            store.close()
            assert interrupts.signum is not None
            raise Interrupted(interrupts.signum, interrupted_message(interrupts.signum, root, runs))
        try:
            controller.tracking.finish()
        except Exception as error:  # as in _loop: the environment's faults are said as such
            controller.folder.check(error)
            raise
        if isinstance(view, PlainLog):
            view.say(f"done in {time.perf_counter() - started:.1f}s")
        store.close()
        controller.folder.close()
    finally:
        pool.stop()
    return root


def _loop(controller: Controller, interrupts: Interrupts) -> bool:
    """The controller's turns until every run is done, or after an interrupt until its chunks in training
    are durable (or abandoned: returns True)."""
    try:
        while controller.step():
            if interrupts.requested:
                controller.winding_down = True
                if interrupts.give_up():
                    return True
    except Exception as error:  # MLflow's store failing in a folder that moved or a full disk: said as such
        controller.folder.check(error)
        raise
    return False
