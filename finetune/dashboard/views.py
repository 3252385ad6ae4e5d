"""The JSON behind every view of the dashboard, read from an experiment directory.

Reads go to the state store and `plan.json`; changes are control requests (rows in the state
store), the same that `finetune ctl` writes, applied by the controller at the next chunk boundary.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

from finetune.plan.model import PlannedRun, RunPlan
from finetune.schedule.control import ACTS_ON, RequestKind, RequestRejected
from finetune.schedule.folder import controller_alive, open_store, read_plan, shown_state
from finetune.schedule.records import RunStatus
from finetune.schedule.requests import Submitted, submit_request
from finetune.schedule.store import StateStore
from finetune.track.colors import run_colors
from finetune.track.lineage import lineages
from finetune.track.ranking import evaluation_metrics, ranked_runs, ranking_metric
from finetune.track.report import DECISION_KINDS

CURVES = ("loss", "eval_loss", "reward")  # and the eval_conf metrics of the runs
RUN_CURVES = (*CURVES, "learning_rate", "grad_norm")  # a run's page shows its optimizer too
MAX_SAMPLES = 200  # generation samples shown on a run's page, latest first
CONTROLS = ("stop", "resume", "retry", "delete")
CLONE_FIELDS = ("set", "warm_start")


@contextmanager
def opened(root: Path) -> Iterator[tuple[StateStore, RunPlan]]:
    plan = read_plan(root)
    store = open_store(root)
    try:
        yield store, plan
    finally:
        store.close()


def mlflow_info(root: Path) -> dict[str, Any]:
    known = _tracking(root / "tracking.json")
    uri = str(known.get("uri") or "")
    web = uri.rstrip("/") if uri.startswith(("http://", "https://")) else None
    command = None if web else f"mlflow ui --backend-store-uri {uri}"
    return {"uri": uri, "web": web, "command": command, "parent_run_id": known.get("parent_run_id")}


def _tracking(path: Path) -> dict[str, Any]:
    """Where tracking goes; an unreadable file only costs the MLflow link."""
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def runs_view(root: Path) -> dict[str, Any]:
    """Every run with its state, chunk progress, knob values, latest metrics and rank."""
    with opened(root) as (store, plan):
        metric, direction = ranking_metric(plan)
        evaluated = [name for name in evaluation_metrics(plan) if name not in CURVES]
        latest_logged = {name: store.latest_metric(name) for name in (*CURVES, *evaluated)}
        base = store.metrics_at(0)  # the evaluation before training (training_args.eval_on_start)
        runs = []
        rows = store.runs()
        chains = lineages({row.run_id: row.parent_run_id for row in rows})
        colors = run_colors(row.run_id for row in rows)
        alive = controller_alive(root)
        for entry in ranked_runs(store, plan):
            row = entry.row
            planned = _planned(plan, row.run_id)
            latest = {name: values[row.run_id] for name, values in latest_logged.items() if row.run_id in values}
            runs.append({
                "run_id": row.run_id, "label": row.label, "state": shown_state(row.state, alive), "rank": entry.rank,
                "value": entry.value,
                "chunks_done": row.chunks_done, "total_chunks": row.total_chunks, "error": row.error,
                "knobs": planned.knobs if planned else {}, "latest": {**latest, **row.latest_metrics},
                "parent_run_id": row.parent_run_id, "lineage": chains.get(row.run_id, []), "mlflow_run_id": row.mlflow_run_id,
                "actions": actions(row.state, alive), "color": colors[row.run_id],
                "base": {name: value for name, value in base.get(row.run_id, {}).items() if name in (*CURVES, *evaluated)},
            })
    return {"experiment": plan.experiment, "metric": metric, "direction": direction, "runs": runs, "mlflow": mlflow_info(root),
            "eval_metrics": evaluated}


def actions(state: str, controller_alive: bool = True) -> list[str]:
    """The requests a run in `state` accepts (the controller's own table), for the page's buttons. A run left
    running by a controller that is gone is pending for the next one (`finetune run --resume`)."""
    state = "pending" if state == "running" and not controller_alive else state
    try:
        status = RunStatus(state)
    except ValueError:
        return []
    return [kind.value for kind in RequestKind if status in ACTS_ON[kind]]


def curves_view(root: Path) -> dict[str, dict[str, list[list[float]]]]:
    """Learning curves by metric, then by run: [[step, value], ...]."""
    with opened(root) as (store, plan):
        curves = {name: store.metric_series(name) for name in dict.fromkeys([*CURVES, *evaluation_metrics(plan)])}
    return {name: {run: [[step, value] for step, value in points] for run, points in series.items()}
            for name, series in curves.items() if series}


def samples_view(root: Path, run_id: str) -> dict[str, Any]:
    """The answers a run's generation evaluations kept (state.db's `samples` table), oldest step first; step 0
    is the base model's, before training (eval_on_start). Each: step, position, prompt (the messages before
    the answer), question (its last turn), completion, reference."""
    with opened(root) as (store, plan):
        if _planned(plan, run_id) is None:
            raise KeyError(run_id)
        answers = store.answers(run_id)
    for answer in answers:
        prompt = answer["prompt"] if isinstance(answer["prompt"], list) else []
        answer["question"] = str(prompt[-1].get("content", "")) if prompt and isinstance(prompt[-1], dict) else ""
        answer.pop("run_id")
    return {"run_id": run_id, "samples": answers}


def events_view(root: Path) -> list[dict[str, Any]]:
    """Decisions (successive halving, pruning, PBT, runs a search added), control requests and run ends, oldest first."""
    with opened(root) as (store, _):
        return [event for event in store.events() if event["kind"].startswith((*DECISION_KINDS, "run_"))]


def run_config_view(root: Path, run_id: str) -> dict[str, Any]:
    with opened(root) as (_, plan):
        planned = _planned(plan, run_id)
    if planned is None:
        raise KeyError(run_id)
    return {"run_id": run_id, "knobs": planned.knobs, "config": planned.config}


def run_view(root: Path, run_id: str) -> dict[str, Any]:
    """Everything about one run for its page: state, knobs, config, chunks, curves, events (failures with
    their tracebacks) and generation samples where the experiment stores them."""
    with opened(root) as (store, plan):
        rows = store.runs()
        row = next((row for row in rows if row.run_id == run_id), None)
        if row is None:
            raise KeyError(run_id)
        planned = _planned(plan, run_id)
        names = dict.fromkeys([*RUN_CURVES, *evaluation_metrics(plan)])
        curves = {name: [[step, value] for step, value in series[run_id]]
                  for name in names if run_id in (series := store.metric_series(name))}
        chunks = [{key: chunk[key] for key in ("chunk", "global_step", "seconds", "step_seconds", "eval_seconds", "metrics")}
                  for chunk in store.chunk_rows(run_id)]
        events = [event for event in store.events() if event.get("run_id") == run_id]
        metric, direction = ranking_metric(plan)
    return {
        "experiment": plan.experiment, "run_id": run_id, "label": row.label,
        "state": shown_state(row.state, controller_alive(root)), "error": row.error,
        "color": run_colors(r.run_id for r in rows)[run_id], "chunks_done": row.chunks_done, "total_chunks": row.total_chunks,
        "parent_run_id": row.parent_run_id, "lineage": lineages({r.run_id: r.parent_run_id for r in rows}).get(run_id, []),
        "knobs": planned.knobs if planned else {}, "config": planned.config if planned else None,
        "latest": row.latest_metrics, "metric": metric, "direction": direction, "curves": curves, "chunks": chunks,
        "events": events, "samples": run_samples(root / "state.db", run_id), "mlflow": mlflow_info(root),
        "mlflow_run_id": row.mlflow_run_id, "actions": actions(row.state, controller_alive(root)),
    }


def run_samples(db_path: Path, run_id: str) -> list[dict[str, Any]] | None:
    """The generation samples of a run (prompt, completion, reference...), latest step first, from a `samples`
    table of state.db with a `run_id` column; None when the experiment keeps no samples (the page says so).

    The hook for stored generation samples: any columns are shown, so the table's exact shape is free."""
    try:
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            columns = [row[1] for row in db.execute("PRAGMA table_info(samples)")]
            if "run_id" not in columns:
                return None
            order = ", ".join([*(["step DESC"] if "step" in columns else []), *(["position"] if "position" in columns else []), "rowid DESC"])
            rows = db.execute(f"SELECT * FROM samples WHERE run_id = ? ORDER BY {order} LIMIT ?", (run_id, MAX_SAMPLES)).fetchall()
    except sqlite3.Error:
        return None
    return [{key: _sample_value(value) for key, value in zip(columns, row) if key != "run_id"} for row in rows]


def _sample_value(value: Any) -> Any:
    """Cells as they are, JSON text decoded (a list of messages, a dict of scores)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def request_control(root: Path, kind: str, run_id: str) -> dict[str, Any]:
    """Queue stop/resume/retry/delete, checked as `finetune ctl` checks it (`RequestRejected`: why not)."""
    if kind not in CONTROLS:
        raise RequestRejected([("", f"unknown action {kind}; one of {', '.join(CONTROLS)}")])
    return _accepted(submit_request(root, kind, run_id))


def request_clone(root: Path, run_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Validate and plan the edited config now, so errors show next to their fields; then queue the clone.

    `body` is `{"set": {KEY: VALUE}, "warm_start": bool}`; a string VALUE is YAML, as after `--set KEY=`."""
    unknown = [(str(key), f"unknown field; a clone request has {' and '.join(CLONE_FIELDS)}") for key in body if key not in CLONE_FIELDS]
    changes = body.get("set", {})
    if not isinstance(changes, dict):
        raise RequestRejected([*unknown, ("set", "set must map config keys to values")])
    problems = unknown + [(key, problem) for key in changes if (problem := _key_problem(key))]
    if problems:
        raise RequestRejected(problems)
    settings = [f"{key.strip()}={_as_yaml(value)}" for key, value in changes.items() if key.strip()]
    return _accepted(submit_request(root, "clone", run_id, {"set": settings, "warm_start": body.get("warm_start", False)}))


def _key_problem(key: str) -> str | None:
    if "=" in key:
        return "a config key has no '='"
    if any(part.isdigit() and not part.isdecimal() for part in key.strip().split(".")):
        return "each part of a dotted key is a name or a list index (0, 1, ...)"
    return None


def _accepted(submitted: Submitted) -> dict[str, Any]:
    return {"request_id": submitted.request_id, "live": submitted.live}


def _as_yaml(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _planned(plan: RunPlan, run_id: str) -> PlannedRun | None:
    return next((run for run in plan.runs if run.run_id == run_id), None)
