"""state.db is the truth, `optuna.db` a cache of it: a study that is missing, damaged or does not match the plan
is rebuilt from the runs' knobs and their durable chunks' values, one trial per trial number (a number whose
run never joined the plan becomes a failed trial, so that numbers stay the runs')."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.search.contract import RunInfo, latest_metrics
from finetune.search.study_space import replayed

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)
RUN_ATTR = "run_id"


def set_aside(path: Path) -> Path | None:
    """Move a damaged study file out of the way (kept for inspection); its new name, or None when absent."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    path.rename(target)
    for suffix in ("-journal", "-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target


def mismatch(study: optuna.Study, runs: list[RunInfo]) -> str | None:
    """Why the study does not hold the plan's trials (None: it does)."""
    trials = study.get_trials(deepcopy=False)
    for run in runs:
        number = run.planned.trial
        if number is None:
            continue
        if number >= len(trials):
            return f"it has no trial {number} (run {run.run_id})"
        if trials[number].user_attrs.get(RUN_ATTR) not in (None, run.run_id):
            return f"its trial {number} is another run's"
    return None


def rebuild(study: optuna.Study, tree: dict[str, Any], metric: str, runs: list[RunInfo],
            chunk_rows: list[dict[str, Any]]) -> int:
    """Add to the (empty) `study` one trial per trial number of `runs`; how many trials were added."""
    from optuna.trial import TrialState, create_trial

    by_number = {run.planned.trial: run for run in runs if run.planned.trial is not None}
    values = latest_metrics(chunk_rows)
    for number in range(max(by_number, default=-1) + 1):
        run = by_number.get(number)
        space = replayed(tree, run.planned.knobs) if run is not None else None
        if run is None or space is None:
            reason = "its run never joined the plan" if run is None else "its knobs are not the study's"
            study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"rejected": f"rebuilt: {reason}"}))
            continue
        params, distributions = space
        steps = {done: float(metrics[metric]) for done, metrics in values.get(run.run_id, {}).items()
                 if metric in metrics and math.isfinite(float(metrics[metric]))}
        state, value = _state_of(run, steps)
        study.add_trial(create_trial(state=state, value=value, params=params, distributions=distributions,
                                     intermediate_values=steps, user_attrs={RUN_ATTR: run.run_id}))
    return len(by_number)


def _state_of(run: RunInfo, steps: dict[int, float]) -> tuple[Any, float | None]:
    """A completed run's trial is complete with its last value, a stopped one pruned, a deleted one failed; a
    run that may still train (pending, failed, which `ctl retry` continues) keeps its trial running."""
    from optuna.trial import TrialState

    if run.status == "completed":
        return (TrialState.COMPLETE, steps[max(steps)]) if steps else (TrialState.FAIL, None)
    if run.status == "stopped":
        return TrialState.PRUNED, (steps[max(steps)] if steps else None)
    if run.status == "deleted":
        return TrialState.FAIL, None
    return TrialState.RUNNING, None
