"""Before training: the experiment directory, exact data sizes and the plan saved as `plan.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from finetune.config.validation import CONFIG_ADAPTER
from finetune.io import write_json_atomic
from finetune.plan.build import PROPOSING_STRATEGIES
from finetune.plan.compare import plan_differences
from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.folder import CACHE_DIR, read_plan


class ExperimentError(RuntimeError):
    pass


class RunUnprepared(ExperimentError):
    """A run added to a running experiment (a clone) that could not start: (key path, problem) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {problem}" if path else problem for path, problem in problems))
        self.problems = problems


def experiment_dir(plan: RunPlan) -> Path:
    return Path(plan.output_dir) / plan.experiment


# ---------------------------------------------------------------- exact sizes before training


def finalize_plan(plan: RunPlan, root: Path) -> RunPlan:
    """Prepare (and cache) each data setting once, then derive steps and chunks from the real sizes."""
    from finetune.data.pipeline import prepare_data, prepare_tokenizer
    from finetune.plan.derive import derive
    from finetune.train.bases import base_key
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
            stats = prepare_data(config, tokenizers[key], root / CACHE_DIR).stats
            run = run.model_copy(update={"derived": derive(config, stats.train_rows)})
        except Exception as error:  # a run whose model or data cannot be prepared fails alone
            failed[run.run_id] = f"{type(error).__name__}: {error}"
        runs.append(run)
    return plan.model_copy(update={"runs": runs, "failed": failed})


def prepare_run(plan: RunPlan, root: Path, run: PlannedRun, devices: list[str] | None) -> PlannedRun:
    """A run added to `plan` while it trains, prepared as a run of the plan was: every start-up
    problem found now, its data prepared (cached per data setting), and its steps derived from its
    own data sizes."""
    from finetune.train.model import load_tokenizer

    config = CONFIG_ADAPTER.validate_python(run.located(root).config)
    problems = start_up_problems(config, devices, load_tokenizer)
    if problems:
        raise RunUnprepared(problems)
    prepared = finalize_plan(plan.model_copy(update={"runs": [run], "failed": {}}), root)
    if prepared.failed:
        raise RunUnprepared([("", prepared.failed[run.run_id])])
    return prepared.runs[0]


def start_up_problems(config: Any, devices: list[str] | None, load_tokenizer: Callable[[Any], Any],
                      read_records: Callable[[str, str, str], Any] | None = None) -> list[tuple[str, str]]:
    """Every problem a run would hit at start-up, as (key path, problem): `train.preflight`'s (the data
    read and the chat template applied to its first records, with `read_records`), and a
    `resume_from_checkpoint` that is not a checkpoint."""
    from finetune.data.readers import read_records as read_all
    from finetune.train.preflight import preflight

    problems = preflight(config, devices, load_tokenizer, read_records or read_all)
    try:
        initial_checkpoint(config)
    except ExperimentError as error:
        problems.append(("run_conf.resume_from_checkpoint", str(error).partition(": ")[2]))
    return problems


def initial_checkpoint(config: Any) -> str | None:
    """`run_conf.resume_from_checkpoint` as a path: the checkpoint (HF's or a finetune chunk; a sharded
    chunk for a sharded run) a run starts from.

    `auto`, true and false need nothing here: every run always continues from its last durable chunk.
    """
    value = config.run_conf.resume_from_checkpoint
    if not isinstance(value, str) or value.lower() in ("auto", "true", "false"):
        return None
    from finetune.train.sharded import start_problem

    problem = start_problem(value, config.experiment.distributed, config)
    if problem:
        raise ExperimentError(f"run_conf.resume_from_checkpoint: {problem}")
    return value


def load_or_create_plan(plan: RunPlan, root: Path, resume: bool) -> RunPlan:
    saved = root / "plan.json"
    if saved.is_file():
        existing = read_plan(root)
        if resume:
            return existing
        differences = plan_differences(existing, plan)
        if not differences:
            return existing
        raise ExperimentError(
            f"{root} already holds an experiment planned from another config; the plan on disk is the plan:\n  "
            + "\n  ".join(differences)
            + f"\nEither give experiment.name another value (a new experiment), or continue the saved plan with "
            f"`finetune run --resume {root}`."
        )
    if resume:
        read_plan(root)  # missing: says so, and what to do
    final = finalize_plan(plan, root)
    proposing = any(sweep.get("strategy") in PROPOSING_STRATEGIES for sweep in final.sweeps)  # may yet propose runs
    if final.runs and len(final.failed) == len(final.runs) and not proposing:  # said before any work, no plan saved
        raise ExperimentError(nothing_prepared(final.failed))
    write_json_atomic(saved, final.model_dump(mode="json"))
    return final


def nothing_prepared(failed: dict[str, str]) -> str:
    """Every run's preparation failed: each problem once, with the runs it stopped."""
    runs_by_problem: dict[str, list[str]] = {}
    for run_id, problem in failed.items():
        runs_by_problem.setdefault(problem, []).append(run_id)
    lines = [f"{problem} (run{'s' if len(runs) > 1 else ''} {', '.join(runs)})" for problem, runs in runs_by_problem.items()]
    return "no run's model and data could be prepared, so nothing was trained:\n  " + "\n  ".join(lines)
