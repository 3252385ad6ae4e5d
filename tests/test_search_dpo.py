"""A DPO sweep decides and ranks by what DPO logs while it trains (its reward margins), end to end on the demo
model (CPU): the chunk record carries `rewards/margins` and `rewards/accuracies`, successive halving keeps the
runs of the larger margins (the direction comes from the metric: maximize), and the report ranks by it."""

from __future__ import annotations

import json
import subprocess
import pytest
import yaml

from tests.helpers import state_db
from tests.test_training import EXAMPLES, FINETUNE

pytestmark = pytest.mark.slow


def test_dpo_successive_halving_by_reward_margins_keeps_the_larger_margins_and_the_report_ranks_by_them(tmp_path, demo_dir) -> None:
    text = (EXAMPLES / "dpo.yaml").read_text().replace("demo/", f"{demo_dir}/").replace("beta: !list [0.1, 0.3]", "beta: 0.1")
    config = yaml.safe_load(text)
    config["experiment"] = {"name": "dpo-sha", "num_chunks": 2}
    # Larger rates give larger margins after two steps; successive halving is asynchronous (a run is judged against
    # those that reached the rung before it), so the plan's order matters: the largest rate is judged first.
    config["training_args"].update(learning_rate={"$list": [3e-2, 3e-3, 3e-4, 1e-5]}, max_steps=4)
    config["sweep"] = {"strategy": "successive_halving", "num_runs": 4, "metric": "rewards/margins"}  # no direction
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([*FINETUNE, "run", "dpo.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root = tmp_path / "runs" / "dpo-sha"
    with state_db(root) as db:
        first = {run_id: json.loads(metrics) for run_id, metrics in db.execute("SELECT run_id, metrics FROM chunks WHERE chunk = 0")}
        states = dict(db.execute("SELECT run_id, state FROM runs").fetchall())
        stops = [json.loads(detail) for (detail,) in db.execute("SELECT detail FROM events WHERE kind = 'sha_stop'")]
        goes_on = [json.loads(detail) for (detail,) in db.execute("SELECT detail FROM events WHERE kind = 'sha_continue'")]
    assert all({"rewards/margins", "rewards/accuracies"} <= metrics.keys() for metrics in first.values()), first
    margins = {run_id: metrics["rewards/margins"] for run_id, metrics in first.items()}
    assert len(set(margins.values())) == len(margins), "distinct margins: which runs go on is decided by them"
    stopped = {run_id for run_id, state in states.items() if state == "stopped"}
    went_on = set(margins) - stopped
    assert stopped and went_on and all(event["metric"] == "rewards/margins" for event in stops + goes_on)
    # each decision by a larger-is-better rule: stopped below the rung's cutoff, went on at or above it
    assert all(event["value"] < event["cutoff"] for event in stops) and all(event["value"] >= event["cutoff"] for event in goes_on)
    assert max(margins, key=margins.get) in went_on
    # maximize: every run that went on had a larger margin than every run stopped (inverted, the smallest go on)
    assert min(margins[run_id] for run_id in went_on) > max(margins[run_id] for run_id in stopped), (margins, states)
    report = subprocess.run([*FINETUNE, "report", str(root)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (root / "report.md").read_text()
    assert "Ranked by `rewards/margins` (maximize)" in text
    ranked = [line.split("`")[1] for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert sorted(ranked) == sorted(margins) and set(ranked[:len(went_on)]) == went_on, "runs that went on rank above the stopped"
