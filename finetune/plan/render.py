"""Rich rendering of a run plan."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from finetune.config.knobs import ListKnob, dotted, iter_knobs, parse_knob
from finetune.plan.build import PROPOSING_STRATEGIES, short_knob_names
from finetune.plan.expand import format_value
from finetune.plan.model import PlannedRun, RunPlan


def plan_table(plan: RunPlan, width: int | None = None) -> Table:
    """The plan as a table for a terminal `width` columns wide (None: as wide as it needs)."""
    knob_names = list(dict.fromkeys(name for run in plan.runs for name in run.knobs))
    headers = short_knob_names(knob_names)
    proposed = " (more proposed as it goes)" if plan.search_spaces else ""
    table = Table(title=Text(f"{plan.experiment}: {len(plan.runs)} run(s){proposed} from {plan.source}"), title_justify="left")
    gangs = any(run.derived.num_processes > 1 or _strategy(run) != "ddp" for run in plan.runs)
    groups = len({run.group for run in plan.runs}) > 1
    rows = []
    for run in plan.runs:
        derived = run.derived
        rows.append((
            [run.run_id, *([str(run.group)] if groups else [])],
            [_knob_cell(run.knobs.get(name, ""), name, run.label, headers) for name in knob_names],
            [*([f"{derived.num_processes} {_strategy(run)}"] if gangs else []),
             f"{derived.per_device_train_batch_size}x{derived.num_processes}",
             str(derived.gradient_accumulation_steps),
             f"{derived.learning_rate:.3g}",
             str(derived.total_steps) if derived.total_steps is not None else "?",
             compact_steps(derived.chunk_steps) if derived.chunk_steps else "?"],
        ))

    def widest(cells: list[str], cap: int = 40) -> int:
        return min(max((len(cell) for cell in cells), default=1), cap)

    # Ids and numbers keep their whole width (never cut, never broken across lines); on a narrow terminal
    # the knob columns give way first (their headers fold; only values past 12 characters fold too), and
    # where even that does not fit, the table drops its vertical rules.
    knob_widths = [widest([row[1][index] for row in rows], cap=12) for index in range(len(knob_names))]
    derived_names = (["devices"] if gangs else []) + ["batch", "accum", "lr", "steps", "chunks"]
    derived_widths = [widest([row[2][index] for row in rows] + [column]) for index, column in enumerate(derived_names)]
    columns = 1 + int(groups) + len(knob_names) + len(derived_names)
    needed = 10 + 5 * int(groups) + sum(knob_widths) + sum(derived_widths) + 3 * columns + 1
    if width is not None and needed > width:
        table.box, table.padding = box.SIMPLE_HEAD, (0, 1, 0, 0)
    table.add_column("run", style="cyan", no_wrap=True, min_width=10)
    if groups:
        table.add_column("group", justify="right", no_wrap=True)
    for name, knob_width in zip(knob_names, knob_widths):
        table.add_column(headers[name], overflow="fold", min_width=knob_width)
    for column, derived_width in zip(derived_names, derived_widths):
        table.add_column(column, justify="right", no_wrap=True, min_width=derived_width)
    for ids, knob_cells, derived_cells in rows:
        table.add_row(*ids, *(Text(cell) for cell in knob_cells), *derived_cells)  # user values: never read as markup
    return table


def compact_steps(steps: list[int]) -> str:
    """Chunk sizes, runs of equal ones counted: [16, 16, 16, 17] -> '3x16+17'."""
    parts: list[list[int]] = []
    for size in steps:
        if parts and parts[-1][1] == size:
            parts[-1][0] += 1
        else:
            parts.append([1, size])
    return "+".join(f"{count}x{size}" if count > 1 else str(size) for count, size in parts)


def plan_summary(plan: RunPlan) -> str:
    total = plan.total_steps
    steps = f"{total} optimizer steps in all" if total is not None else "steps unknown until the data is read (and tokenised, when packed)"
    strategies = ", ".join(sorted({sweep.get("strategy", "grid") for sweep in plan.sweeps}))
    ahead = " planned ahead (the study proposes the others as it goes)" if plan.search_spaces and not plan.runs else ""
    return f"{len(plan.runs)} run(s){ahead}, {steps}, {_chunks_per_run(plan)}, strategy {strategies}"


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


def search_space_lines(plan: RunPlan) -> list[str]:
    """For each group that proposes runs while the experiment goes on: how, and over which knobs."""
    lines = []
    for group, tree in sorted(plan.search_spaces.items()):
        sweep = plan.sweeps[group]
        lines.append(f"group {group}: {_search_summary(sweep)}")
        for path, plain in iter_knobs(tree):
            lines.append(f"  {dotted(path)}: {_knob_text(plain)}")
    return lines


def _search_summary(sweep: dict) -> str:
    from finetune.config.scheduling import OptunaSweep, PopulationBasedSweep

    if sweep.get("strategy") in PROPOSING_STRATEGIES:
        study = OptunaSweep.model_validate(sweep)
        return (f"an Optuna study proposes runs as the experiment goes, as slots free up: up to {study.num_runs} in all, "
                f"{study.max_concurrent_runs} at a time; sampler {study.sampler} (its first {study.startup()} at random), "
                f"pruner {study.pruner} from chunk {study.min_chunks}; {study.direction} {study.metric}. Search space:")
    pbt = PopulationBasedSweep.model_validate(sweep)
    return (f"population-based training of the {pbt.num_runs} runs above: every {pbt.perturbation_interval} chunk(s) the "
            f"worst {pbt.quantile_fraction:.0%} are replaced by warm-started clones of the best {pbt.quantile_fraction:.0%} "
            f"({pbt.direction} {pbt.metric}), these knobs perturbed (peft_conf ones kept: a warm start keeps the adapter):")


def _knob_text(plain: dict) -> str:
    knob = parse_knob(plain)
    if isinstance(knob, ListKnob):
        return "one of " + ", ".join(format_value(value) for value in knob.values)
    kind = "int" if knob.is_int else "float"
    return f"{kind} in [{format_value(knob.start)}, {format_value(knob.end)}]" + (", log scale" if knob.log else "")
