"""The dashboard's run pages, run colours shared with the report, and serving on a busy port."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from finetune.schedule.store import StateStore
from finetune.track.colors import PALETTE, run_colors
from tests.test_dashboard import client, experiment, set_state

TRACEBACK = 'Traceback (most recent call last):\n  File "worker.py", line 9, in train\nRuntimeError: CUDA out of memory'
GENERATION_METRICS = ["eval_loss", "token_accuracy", "exact_match", "rouge_l", "bleu", "chrf"]


def rich_experiment(tmp_path: Path) -> Path:
    """Six runs (learning rate x rank), every generation metric, one run evaluated once and stopped at
    rung 1, one failed with a traceback, and the decisions of successive halving: what a user sees."""
    root = experiment(tmp_path, eval_conf={"metrics": GENERATION_METRICS}, peft_conf={
        "peft_type": "LORA", "peft_kwargs": {"r": {"$list": [4, 16]}, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}})
    store = StateStore(root / "state.db")
    runs = [row.run_id for row in store.runs()]
    for index, run_id in enumerate(runs):
        evaluations = 1 if index == 1 else 3
        for chunk in range(evaluations):
            store.log_metrics(run_id, 2 * (chunk + 1), {"eval_loss": 0.2009 + 0.0131 * index - 0.01 * chunk, "rouge_l": 0.1 * chunk})
    store.event("sha_continue", runs[0], rung=1, metric="eval_loss", value=0.2009, cutoff=0.25, seen=1)
    store.event("sha_stop", runs[1], rung=1, metric="eval_loss", value=0.214, cutoff=0.21, seen=2)
    store.event("run_failed", runs[2], error="RuntimeError: CUDA out of memory", traceback=TRACEBACK)
    store.close()
    set_state(root, runs[1], "stopped")
    set_state(root, runs[2], "failed")
    return root


def run_ids(root: Path) -> list[str]:
    store = StateStore(root / "state.db")
    try:
        return [row.run_id for row in store.runs()]
    finally:
        store.close()


def test_each_run_has_one_colour_that_follows_the_order_runs_joined(tmp_path) -> None:
    root = rich_experiment(tmp_path)
    order = run_ids(root)
    colors = {run["run_id"]: run["color"] for run in client(root).get("/api/runs").json()["runs"]}  # listed best first
    assert colors == run_colors(order) and len(set(colors.values())) == len(order)
    assert [colors[run_id] for run_id in order] == list(PALETTE[: len(order)])
    assert client(root).get(f"/api/runs/{order[3]}").json()["color"] == PALETTE[3]


def test_the_report_plots_each_run_in_its_dashboard_colour(tmp_path, monkeypatch) -> None:
    import matplotlib.colors
    import matplotlib.pyplot as plt

    from finetune.track.report import plot_curves

    root = rich_experiment(tmp_path)
    order = run_ids(root)
    store = StateStore(root / "state.db")
    store.log_metrics(order[-1], 1, {"eval_loss": 0.3})  # the last run's curve starts first: the plot meets it first
    store.close()
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: figures.append(figure) or close(figure))
    plot_curves(root, ("eval_loss",))
    drawn = {line.get_label().split()[0]: matplotlib.colors.to_hex(line.get_color()) for line in figures[0].axes[0].lines}
    assert drawn == run_colors(order)
    assert drawn[order[-1]] == PALETTE[len(order) - 1] != PALETTE[0]


def test_a_run_page_has_its_config_knobs_curves_chunks_events_and_no_samples_yet(tmp_path) -> None:
    root = rich_experiment(tmp_path)
    failed = run_ids(root)[2]
    page = client(root).get(f"/run/{failed}")
    assert page.status_code == 200 and "/static/run.js" in page.text
    run = client(root).get(f"/api/runs/{failed}").json()
    assert run["state"] == "failed" and run["knobs"].keys() == {"training_args.learning_rate", "peft_conf.peft_kwargs.r"}
    assert run["config"]["peft_conf"]["peft_kwargs"]["r"] == run["knobs"]["peft_conf.peft_kwargs.r"]
    assert [point[0] for point in run["curves"]["eval_loss"]] == [2, 4, 6] and run["curves"]["loss"] == [[1, 3.0], [2, 2.0]]
    assert [chunk["chunk"] for chunk in run["chunks"]] == [0] and run["chunks"][0]["metrics"] == {"eval_loss": 1.0}
    (failure,) = [event for event in run["events"] if event["kind"] == "run_failed"]
    assert failure["traceback"] == TRACEBACK and all(event["run_id"] == failed for event in run["events"])
    assert not run["samples"]  # no evaluation kept an answer yet: the page says so
    missing = client(root).get("/api/runs/nope")
    assert missing.status_code == 404 and missing.json() == {"error": "no run nope"}


def test_a_run_page_shows_the_generation_samples_state_db_keeps(tmp_path) -> None:
    """The hook for stored samples: a `samples` table with a run_id column, whatever its other columns."""
    root = rich_experiment(tmp_path)
    first, second = run_ids(root)[:2]
    with sqlite3.connect(root / "state.db") as db:
        db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)", [
            (first, 4, 1, '[{"role": "user", "content": "3 plus 2?"}]', "5", "5"),
            (first, 2, 0, '[{"role": "user", "content": "1 plus 2?"}]', "3", "3"), (first, 4, 0, '[{"role": "user", "content": "2 plus 2?"}]', "5", "4"),
            (second, 2, 0, "x", "y", "z")])
    samples = client(root).get(f"/api/runs/{first}").json()["samples"]
    assert [(sample["step"], sample["position"]) for sample in samples] == [(4, 0), (4, 1), (2, 0)]  # latest step first
    assert samples[0] == {"step": 4, "position": 0, "prompt": [{"role": "user", "content": "2 plus 2?"}], "completion": "5", "reference": "4"}


def test_a_busy_port_is_one_line_saying_what_to_do(tmp_path) -> None:
    from finetune.cli import app

    root = experiment(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["dashboard", str(root), "--port", str(port)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is in use" in lines[0] and "--port 0" in lines[0], result.output


def test_the_run_page_and_the_chart_script_load_nothing_from_elsewhere(tmp_path) -> None:
    root = experiment(tmp_path)
    texts = [client(root).get(path).text for path in ("/run/x", "/static/run.js", "/static/charts.js")]
    assert "/static/charts.js" in texts[0] and "/static/run.js" in texts[0]
    for text in texts:
        assert "https://" not in text and "cdn" not in text.lower()
        assert "http://" not in text.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace is a name, not a load
