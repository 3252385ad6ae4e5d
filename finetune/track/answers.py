"""What `finetune report` adds about answers: the base model's scores (the evaluation at step 0 that
`training_args.eval_on_start` asks for) and the answers kept by generation metrics, side by side for
the best runs."""

from __future__ import annotations

from typing import Any

from finetune.schedule.store import StateStore

BEST_RUNS_SHOWN = 3
CELL_LIMIT = 80


def base_scores(store: StateStore, names: list[str]) -> dict[str, dict[str, float]]:
    """Each run's scores at step 0 among `names` (runs evaluated before training only)."""
    at_start = store.metrics_at(0)
    return {run_id: {name: values[name] for name in names if name in values}
            for run_id, values in at_start.items() if any(name in values for name in names)}


def base_row(base: dict[str, dict[str, float]], run_ids: list[str], names: list[str]) -> dict[str, float] | None:
    """The one set of base scores when every run that has them has the same (runs on one base model)."""
    distinct = {tuple(sorted(base[run_id].items())) for run_id in run_ids if run_id in base}
    return dict(next(iter(distinct))) if len(distinct) == 1 else None


def _cell(text: Any) -> str:
    shown = " ".join(str(text).split())
    shown = shown if len(shown) <= CELL_LIMIT else shown[: CELL_LIMIT - 1] + "…"
    return shown.replace("|", "\\|") or " "


def answers_markdown(store: StateStore, best: list[Any]) -> list[str]:
    """The best runs' latest kept answers next to the reference and the base model's (step 0), one row per prompt."""
    shown = [entry.row.run_id for entry in best[:BEST_RUNS_SHOWN]]
    kept = [answer for answer in store.answers() if answer["run_id"] in shown]
    if not kept:
        return []
    latest: dict[str, int] = {}
    for answer in kept:
        latest[answer["run_id"]] = max(latest.get(answer["run_id"], 0), answer["step"])
    by_run = {run_id: {a["position"]: a for a in kept if a["run_id"] == run_id and a["step"] == step}
              for run_id, step in latest.items() if step > 0}
    base = next(({a["position"]: a for a in kept if a["run_id"] == run_id and a["step"] == 0}
                 for run_id in shown if any(a["run_id"] == run_id and a["step"] == 0 for a in kept)), {})
    runs = [run_id for run_id in shown if run_id in by_run]
    positions = sorted({position for answers in [base, *by_run.values()] for position in answers})
    if not positions:
        return []
    headers = ["prompt", "reference", *(["base (step 0)"] if base else []),
               *(f"`{run_id}` (step {latest[run_id]})" for run_id in runs)]
    lines = ["", "## Answers", "",
             f"The answers kept at each run's latest evaluation, for the {len(runs)} best run(s)"
             + (", and the base model's before training" if base else "") + ".", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for position in positions:
        first = next(answers[position] for answers in [base, *by_run.values()] if position in answers)
        question = first["prompt"][-1].get("content", "") if first["prompt"] else ""
        cells = [question, first["reference"], *([base[position]["completion"] if position in base else ""] if base else []),
                 *(by_run[run_id][position]["completion"] if position in by_run[run_id] else "" for run_id in runs)]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines
