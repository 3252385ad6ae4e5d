"""`finetune report`: a Markdown comparison of the runs, learning curves as PNG, the lineage of runs made from
others, and the decisions (successive halving, pruning, PBT, control requests)."""

from __future__ import annotations

from pathlib import Path

from finetune.io import write_text_atomic
from finetune.schedule.folder import open_store, read_plan
from finetune.track.colors import run_colors
from finetune.track.lineage import lineage_text, lineages
from finetune.track.ranking import evaluation_metrics, ranked_runs, ranking_metric

CURVES = ("loss", "eval_loss", "reward")  # and the eval_conf metrics of the runs
# Events that are decisions: successive halving's, control requests, a study's pruning, PBT's exploits, runs a search added.
DECISION_KINDS = ("sha_", "ctl_", "optuna_", "pbt_", "search_")


def report_markdown(root: Path) -> str:
    plan = read_plan(root)
    store = open_store(root)
    metric, direction = ranking_metric(plan)
    ranked = ranked_runs(store, plan)
    others = [name for name in evaluation_metrics(plan) if name != metric]
    logged = {name: store.latest_metric(name) for name in others}
    measured = any(entry.value is not None for entry in ranked) or not ranked
    lines = [
        f"# {plan.experiment}",
        "",
        f"Ranked by `{metric}` ({direction}), latest value of each run." if measured else _never_measured(metric),
        "",
        f"| rank | run | label | state | chunks | {' | '.join([metric, *others])} |",
        "|---|---|---|---|---|---|" + "---|" * len(others),
    ]
    for entry in ranked:
        row = entry.row
        shown = " | ".join(_shown(value) for value in [entry.value, *(row.latest_metrics.get(name, logged[name].get(row.run_id))
                                                                       for name in others)])
        lines.append(f"| {entry.rank if measured else '-'} | `{row.run_id}` | {row.label} | {row.state} | {row.chunks_done}/{row.total_chunks} | {shown} |")
    chains = lineages({row.run_id: row.parent_run_id for row in store.runs()})
    if chains:
        lines += ["", "## Lineage", "", "Runs made from other runs (clones, population-based training), first ancestor first.",
                  "", "| run | lineage |", "|---|---|"]
        lines += [f"| `{run_id}` | {lineage_text(run_id, chain)} |" for run_id, chain in chains.items()]
    decisions = [event for event in store.events() if event["kind"].startswith(DECISION_KINDS)]
    if decisions:
        lines += ["", "## Decisions", "", "| run | decision | detail |", "|---|---|---|"]
        for event in decisions:
            detail = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("at", "run_id", "kind"))
            lines.append(f"| `{event['run_id']}` | {event['kind']} | {detail} |")
    store.close()
    return "\n".join(lines) + "\n"


def _never_measured(metric: str) -> str:
    """Said instead of a ranking when no run has a value of the metric the runs are ranked by."""
    return (f"**Not ranked: `{metric}` has not been measured for any run.** A generation metric is missing when "
            "every prompt was skipped (`generation_prompts_too_long`: max_new_tokens leaves no room in the model's "
            "context), a custom metric when its function failed (see the workers' warnings).")


def _shown(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else ""


def plot_curves(root: Path, names: tuple[str, ...] = CURVES) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = open_store(root)
    labels = {row.run_id: row.label for row in store.runs()}
    colors = run_colors(labels)  # the dashboard's colours
    written = []
    for name in names:
        series = store.metric_series(name)
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(8, 5))
        for run_id, points in series.items():
            steps, values = zip(*points)
            axes.plot(steps, values, marker=None if name in ("loss", "reward") and len(steps) > 1 else "o",
                      color=colors.get(run_id), label=f"{run_id} {labels.get(run_id, '')}")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(name)
        axes.set_title(f"{root.name}: {name}")
        axes.legend(fontsize="small")
        target = root / f"{name}.png"
        tmp = root / f".{name}.tmp.png"
        figure.savefig(tmp, dpi=100)
        plt.close(figure)
        tmp.replace(target)
        written.append(target)
    store.close()
    return written


def write_report(root: Path) -> tuple[Path, list[Path]]:
    target = root / "report.md"
    text = report_markdown(root)
    plots = plot_curves(root, tuple(dict.fromkeys([*CURVES, *evaluation_metrics(read_plan(root))])))
    if plots:
        text += "\n" + "\n".join(f"![{path.stem}]({path.name})" for path in plots) + "\n"
    write_text_atomic(target, text)
    return target, plots
