"""Rich rendering of a run plan."""

from __future__ import annotations

from rich.table import Table

from finetune.plan.build import short_knob_names
from finetune.plan.expand import format_value
from finetune.plan.model import PlannedRun, RunPlan


def plan_table(plan: RunPlan) -> Table:
    knob_names = list(dict.fromkeys(name for run in plan.runs for name in run.knobs))
    headers = short_knob_names(knob_names)
    table = Table(title=f"{plan.experiment}: {len(plan.runs)} run(s) from {plan.source}", title_justify="left")
    table.add_column("run", style="cyan", no_wrap=True)
    table.add_column("group", justify="right")
    for name in knob_names:
        table.add_column(headers[name], overflow="fold")
    gangs = any(run.derived.num_processes > 1 or _strategy(run) != "ddp" for run in plan.runs)
    if gangs:
        table.add_column("devices", justify="right")
    for column in ("batch", "accum", "lr", "steps", "chunks"):
        table.add_column(column, justify="right")
    for run in plan.runs:
        derived = run.derived
        knob_cells = [_knob_cell(run.knobs.get(name, ""), name, run.label, headers) for name in knob_names]
        device_cells = [f"{derived.num_processes} {_strategy(run)}"] if gangs else []
        table.add_row(
            run.run_id,
            str(run.group),
            *knob_cells,
            *device_cells,
            f"{derived.per_device_train_batch_size}x{derived.num_processes}",
            str(derived.gradient_accumulation_steps),
            f"{derived.learning_rate:.3g}",
            str(derived.total_steps) if derived.total_steps is not None else "?",
            "+".join(map(str, derived.chunk_steps)) if derived.chunk_steps else "?",
        )
    return table


def plan_summary(plan: RunPlan) -> str:
    total = plan.total_steps
    steps = f"{total} optimizer steps in all" if total is not None else "steps unknown until the data exists"
    strategies = ", ".join(sorted({sweep.get("strategy", "grid") for sweep in plan.sweeps}))
    return f"{len(plan.runs)} run(s), {steps}, {_chunks_per_run(plan)}, strategy {strategies}"


def _chunks_per_run(plan: RunPlan) -> str:
    """The num_chunks the runs were planned with: one number, or each group's where groups set their own."""
    by_group: dict[int, set[int]] = {}
    for run in plan.runs:
        experiment = run.config.get("experiment") or {}
        by_group.setdefault(run.group, set()).add(int(experiment.get("num_chunks", plan.num_chunks)))
    values = sorted(set().union(*by_group.values())) if by_group else [plan.num_chunks]
    if len(values) == 1:
        return f"{values[0]} chunk(s) per run"
    each = ", ".join(f"group {group} {'/'.join(map(str, sorted(chunks)))}" for group, chunks in sorted(by_group.items()))
    return f"chunks per run: {each}"


def _strategy(run: PlannedRun) -> str:
    return str((run.config.get("experiment") or {}).get("distributed", "ddp"))


def _knob_cell(value: object, name: str, label: str, headers: dict[str, str]) -> str:
    """The label's text for this knob (e.g. `#1` for a sub-config), else the formatted value."""
    for part in label.split(","):
        key, _, text = part.partition("=")
        if key == headers[name]:
            return text
    return format_value(value)
