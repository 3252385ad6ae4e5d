"""A plan on disk is the plan: what differs between the plan saved in an experiment folder and the plan of a
config run against it again (search spaces, sweep settings, experiment settings and planned runs, not only
the run ids), as lines a person reads."""

from __future__ import annotations

from typing import Any

from finetune.plan.model import RunPlan

MAX_LINES = 20
DECIDING = ("successive_halving", "optuna", "pbt")


def plan_differences(saved: RunPlan, new: RunPlan) -> list[str]:
    """`key: saved X, now Y` for each value that differs; empty when the config plans the saved experiment."""
    lines: list[str] = []
    old_sweeps, new_sweeps = [_sweep(sweep) for sweep in saved.sweeps], [_sweep(sweep) for sweep in new.sweeps]
    for index, (old, now) in enumerate(zip(old_sweeps, new_sweeps)):
        if "direction" not in old:  # a plan written before directions were filled in: the metric's own then too
            now.pop("direction", None)
        lines += _diff(old, now, _group(index, len(new_sweeps), "sweep"))
    if len(saved.sweeps) != len(new.sweeps):
        lines.append(f"groups: saved {len(saved.sweeps)}, now {len(new.sweeps)}")
    for group in sorted(set(saved.search_spaces) | set(new.search_spaces)):
        lines += _diff(saved.search_spaces.get(group), new.search_spaces.get(group), _group(group, len(new_sweeps), ""))
    lines += _diff(saved.settings.model_dump(mode="json"), new.settings.model_dump(mode="json"), "experiment")
    old_runs = {run.run_id: run for run in saved.runs if run.parent_run_id is None and run.trial is None}
    new_runs = {run.run_id: run for run in new.runs}
    for label, ids, plan_runs in (("saved, not in the config", old_runs.keys() - new_runs.keys(), old_runs),
                                  ("in the config, not saved", new_runs.keys() - old_runs.keys(), new_runs)):
        if ids:
            shown = ", ".join(f"{run_id} ({plan_runs[run_id].label})" for run_id in sorted(ids)[:5])
            lines.append(f"runs {label}: {shown}" + (f" and {len(ids) - 5} more" if len(ids) > 5 else ""))
    return lines[:MAX_LINES] + ([f"... and {len(lines) - MAX_LINES} more differences"] if len(lines) > MAX_LINES else [])


def _sweep(sweep: dict[str, Any]) -> dict[str, Any]:
    found = dict(sweep)
    if found.get("strategy") in DECIDING:
        found.setdefault("metric", "eval_loss")
    return found


def _group(index: int, groups: int, section: str) -> str:
    prefix = f"groups[{index}]" if groups > 1 else ""
    return ".".join(part for part in (prefix, section) if part)


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in _diff(old.get(key, _MISSING), new.get(key, _MISSING), f"{path}.{key}" if path else str(key))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for index, (a, b) in enumerate(zip(old, new)) for line in _diff(a, b, f"{path}[{index}]")]
    if old == new:
        return []
    return [f"{path or 'plan'}: saved {_shown(old)}, now {_shown(new)}"]


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


_MISSING = _Missing()


def _shown(value: Any) -> str:
    import json

    if value is _MISSING:
        return "(not set)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
