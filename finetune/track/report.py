"""`finetune report`: a Markdown comparison of the runs, learning curves as PNG, the lineage of runs made from
others, and the decisions (successive halving, pruning, PBT, control requests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.io import write_text_atomic
from finetune.plan.model import RunPlan
from finetune.schedule.folder import open_store, read_plan
from finetune.schedule.store import StateStore
from finetune.track.colors import run_colors
from finetune.track.answers import answers_markdown, base_row, base_scores
from finetune.track.lineage import lineage_text, lineages
from finetune.search.ranking import ranking_rule
from finetune.track.ranking import Ranked, evaluation_metrics, ranked_runs

CURVES = ("loss", "eval_loss", "reward")  # and the eval_conf metrics of the runs
# Events that are decisions: successive halving's, control requests, a study's pruning, PBT's exploits, runs a search added.
DECISION_KINDS = ("sha_", "ctl_", "optuna_", "pbt_", "search_")


def report_markdown(root: Path) -> str:
    plan = read_plan(root)
    store = open_store(root)
    rule = ranking_rule(plan)
    metric, direction = rule.metric, rule.direction
    ranked = ranked_runs(store, plan, rule)
    others = [name for name in evaluation_metrics(plan) if name != metric]
    logged = {name: store.latest_metric(name) for name in others}
    measured = any(entry.value is not None for entry in ranked) or not ranked
    base = base_scores(store, [metric, *others])
    common = base_row(base, [entry.row.run_id for entry in ranked], [metric, *others])
    lines = [
        f"# {plan.experiment}",
        "",
        (f"Ranked by `{metric}` ({direction}), the {rule.rank_by} value of each run; completed runs first, a run "
         "stopped early below every run that got further, a diverged one last." if measured
         else _never_measured(metric, [entry.row.state for entry in ranked])),
        "",
        f"| rank | run | label | state | chunks | {' | '.join([metric, *others])} | note |",
        "|---|---|---|---|---|---|" + "---|" * len(others) + "---|",
    ]
    if common is not None:  # the evaluation before training (eval_on_start), the same for every run
        lines.append(f"| - | base | the model before training (step 0) | | 0 | "
                     f"{' | '.join(_shown(common.get(name)) for name in [metric, *others])} | |")
    for entry in ranked:
        row = entry.row
        values = [entry.value, *(row.latest_metrics.get(name, logged[name].get(row.run_id)) for name in others)]
        own_base = base.get(row.run_id, {}) if common is None else {}
        shown = " | ".join(_shown(value) + (f" (base {_shown(own_base[name])})" if name in own_base else "")
                           for name, value in zip([metric, *others], values))
        lines.append(f"| {entry.rank if measured else '-'} | `{row.run_id}` | {row.label} | {row.state} | {row.chunks_done}/{row.total_chunks} | {shown} | {_note(entry.note, row)} |")
    if measured and ranked and ranked[0].checkpoint and Path(ranked[0].checkpoint).is_dir():
        top = ranked[0]
        lines += ["", f"Best run `{top.row.run_id}`: its {rule.rank_by} checkpoint, written after its chunk {top.chunk} of "
                  f"{top.row.total_chunks} (folders count from 0), is `{top.checkpoint}`; "
                  f"`finetune export {root} best` exports it."]
    lines += cost_and_knobs(store, plan, ranked)
    lines += answers_markdown(store, ranked)
    chains = lineages({row.run_id: row.parent_run_id for row in store.runs()})
    if chains:
        lines += ["", "## Lineage", "", "Runs made from other runs (clones, population-based training), first ancestor first.",
                  "", "| run | lineage |", "|---|---|"]
        lines += [f"| `{run_id}` | {lineage_text(run_id, chain)} |" for run_id, chain in chains.items()]
    decisions = [event for event in store.events() if event["kind"].startswith(DECISION_KINDS)]
    if decisions:
        lines += ["", "## Decisions", "", "| run | decision | detail |", "|---|---|---|"]
        for event in decisions:
            detail = ", ".join(f"{k}={_detail(v)}" for k, v in event.items() if k not in ("at", "run_id", "kind"))
            lines.append(f"| `{event['run_id']}` | {event['kind']} | {detail} |")
    lines += warning_lines(store.events())
    store.close()
    return "\n".join(lines) + "\n"


def warning_lines(events: list[dict]) -> list[str]:
    """A section: the user's functions (custom metrics, reward functions) that failed, and why; the runs went on."""
    warnings = [event for event in events if event["kind"] == "warning"]
    if not warnings:
        return []
    lines = ["", "## Warnings", "", "Your functions that gave no value (or had to be killed); the runs went on.", "",
             "| run | chunk | function | what happened |", "|---|---|---|---|"]
    for event in warnings:
        error = str(event.get("error", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{event['run_id']}` | {event.get('chunk', '')} | {event.get('source', '')} "
                     f"(`{event.get('function', '')}`) | {error} |")
    return lines


def cost_and_knobs(store: StateStore, plan: RunPlan, ranked: list[Ranked]) -> list[str]:
    """A section: each run (in rank order) with its time on the workers, its training speed in tokens a
    second, and the value of every knob of the experiment."""
    knobs = {run.run_id: run.knobs for run in plan.runs}
    names = list(dict.fromkeys(name for run_knobs in knobs.values() for name in run_knobs))
    seconds: dict[str, float] = {}
    for chunk in store.chunk_rows():
        seconds[chunk["run_id"]] = seconds.get(chunk["run_id"], 0.0) + chunk["seconds"]
    speed = tokens_per_second(store.events())
    rates = ["tokens/s"] if speed else []
    lines = ["", "## Runs: time, speed and knobs", "",
             "Time: the seconds the run's chunks took on their workers (training, evaluation and switching). "
             + ("Tokens/s: the tokens trained (attended positions) per second of training steps." if speed
                else "Tokens/s is not shown: the workers of this experiment did not count tokens."), "",
             "| " + " | ".join(["run", "time", *rates, *(f"`{name}`" for name in names)]) + " |",
             "|---|---|" + "---|" * (len(rates) + len(names))]
    for entry in ranked:
        run_id = entry.row.run_id
        time = _duration(seconds[run_id]) if run_id in seconds else ""
        rate = [f"{speed[run_id]:,.0f}" if run_id in speed else ""] if speed else []
        values = [_knob_text(knobs.get(run_id, {}).get(name, "")) for name in names]
        lines.append("| " + " | ".join([f"`{run_id}`", time, *rate, *values]) + " |")
    return lines


def tokens_per_second(events: list[dict[str, Any]]) -> dict[str, float]:
    """run id -> tokens per second of training, from the `chunk_done` events that count tokens (the last
    of each chunk: a chunk trained again after a crash counts once)."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for event in events:
        if event["kind"] == "chunk_done" and event.get("tokens"):
            last[(event["run_id"], event.get("chunk", -1))] = event
    tokens: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for (run_id, _), event in last.items():
        tokens[run_id] = tokens.get(run_id, 0.0) + float(event["tokens"])
        seconds[run_id] = seconds.get(run_id, 0.0) + float(event.get("step_seconds") or 0.0)
    return {run_id: tokens[run_id] / seconds[run_id] for run_id in tokens if seconds[run_id] > 0}


def _detail(value: Any) -> Any:
    """A decision's value as people read it: 0.1064, not 0.10638758708611648; integers stay integers."""
    return f"{value:.4g}" if isinstance(value, float) else value


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _knob_text(value: Any) -> str:
    if value == "":
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def _note(note: str, row: Any) -> str:
    """The ranking's note, and a failed run's error ("Type: message", as the worker stored it; a message of several
    lines is folded onto one, the whole of it on the dashboard's run page)."""
    if row.state != "failed" or not row.error:
        return note
    folded = " ".join(row.error.split())
    error = (folded if len(folded) <= 200 else folded[:199] + "…").replace("|", "\\|")
    return f"{note}: {error}" if note else error


def _never_measured(metric: str, states: list[str]) -> str:
    """Said instead of a ranking when no run has a value of the metric the runs are ranked by."""
    if states and all(state == "failed" for state in states):
        return (f"**Not ranked: every run failed before `{metric}` was measured.** Each run's error is in its note below; "
                "its traceback is on the dashboard's run page (`finetune dashboard`).")
    return (f"**Not ranked: `{metric}` has not been measured for any run.** A generation metric is missing when "
            "every prompt was skipped (`generation_prompts_too_long`: max_new_tokens leaves no room in the model's "
            "context), a custom metric when its function failed (see Warnings below).")


def _shown(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else ""


def plot_curves(root: Path, names: tuple[str, ...] = CURVES, out_dir: Path | None = None) -> list[Path]:
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
        target = (out_dir or root) / f"{name}.png"
        tmp = (out_dir or root) / f".{name}.tmp.png"
        figure.savefig(tmp, dpi=100)
        plt.close(figure)
        tmp.replace(target)
        written.append(target)
    store.close()
    return written


def write_report(root: Path, out_dir: Path | None = None) -> tuple[Path, list[Path]]:
    """report.md and the curves' PNGs, in the experiment folder or `out_dir`."""
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    target = (out_dir or root) / "report.md"
    text = report_markdown(root)
    plots = plot_curves(root, tuple(dict.fromkeys([*CURVES, *evaluation_metrics(read_plan(root))])), out_dir)
    if plots:
        text += "\n" + "\n".join(f"![{path.stem}]({path.name})" for path in plots) + "\n"
    write_text_atomic(target, text)
    return target, plots
