"""GRPO sweeps decide, end to end on the demo model (CPU): the chunk record carries the reward GRPO logs while
training, so successive halving by reward stops the weaker runs (on main the chunk results were `{}` and no
run was ever stopped), and an Optuna study on GRPO prunes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import state_db
from tests.test_training import EXAMPLES, FINETUNE

pytestmark = pytest.mark.slow

# Constant rewards: which run is better does not depend on what the tiny model generates.
REWARDS = '''
def high(completions, **_):
    return [1.0] * len(completions)

def good(completions, **_):
    return [0.5] * len(completions)

def poor(completions, **_):
    return [-0.5] * len(completions)

def low(completions, **_):
    return [-1.0] * len(completions)
'''
VALUES = {"high": 1.0, "good": 0.5, "poor": -0.5, "low": -1.0}


def grpo_sweep(tmp_path: Path, demo_dir: Path, name: str, sweep: dict) -> Path:
    (tmp_path / "constant_rewards.py").write_text(REWARDS)
    config = yaml.safe_load((EXAMPLES / "grpo.yaml").read_text().replace("demo/", f"{demo_dir}/"))
    config["experiment"] = {"name": name, "num_chunks": 2}
    config["training_args"].update(max_steps=2, num_generations=2, max_completion_length=4)
    config["batchsize_conf"] = {"total_train_batch_size": 2, "max_per_device_train_batch_size": 2}
    config["grpo_args"]["reward_functions"] = {"$list": [[f"constant_rewards:{fn}"] for fn in VALUES]}
    config["sweep"] = sweep
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([*FINETUNE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def outcome(root: Path) -> tuple[dict[str, float], dict[str, str], list[dict]]:
    """Each run's reward at chunk 1, its state, and the decisions."""
    plan = json.loads((root / "plan.json").read_text())
    function = {run["run_id"]: run["config"]["grpo_args"]["reward_functions"][0].partition(":")[2] for run in plan["runs"]}
    with state_db(root) as db:
        rows = db.execute("SELECT run_id, metrics FROM chunks WHERE chunk = 0").fetchall()
        states = dict(db.execute("SELECT run_id, state FROM runs").fetchall())
        events = [json.loads(detail) | {"kind": kind, "run_id": run_id}
                  for run_id, kind, detail in db.execute("SELECT run_id, kind, detail FROM events ORDER BY id")]
    rewards = {run_id: json.loads(metrics)["reward"] for run_id, metrics in rows}
    assert all(rewards[run_id] == pytest.approx(VALUES[function[run_id]]) for run_id in rewards), "the chunk record's reward"
    return rewards, states, events


def test_grpo_successive_halving_by_reward_stops_the_weaker_runs(tmp_path, demo_dir) -> None:
    config = grpo_sweep(tmp_path, demo_dir, "sha", {"strategy": "successive_halving", "num_runs": 4, "metric": "reward"})
    run(tmp_path, "run", str(config))
    rewards, states, events = outcome(tmp_path / "runs" / "sha")
    stopped = {run_id for run_id, state in states.items() if state == "stopped"}
    assert stopped, "some run is stopped at the rung (on main: none, the chunk results were empty)"
    best = max(rewards, key=rewards.get)
    assert best not in stopped and states[best] == "completed", "reward is maximized: the best run goes on"
    went_on = set(rewards) - stopped
    # the runs that went on are the top ones: with the direction inverted the run of reward 0.5 is stopped while
    # those of -0.5 and -1 go on (checked by replaying the plan's order through the policy)
    assert min(rewards[run] for run in went_on) > max(rewards[run] for run in stopped)
    decisions = [event for event in events if event["kind"] == "sha_stop"]
    assert {event["run_id"] for event in decisions} == stopped and all(event["metric"] == "reward" for event in decisions)


def test_an_optuna_study_on_grpo_prunes_by_reward(tmp_path, demo_dir) -> None:
    pytest.importorskip("optuna")
    sweep = {"strategy": "optuna", "num_runs": 4, "metric": "reward", "max_concurrent_runs": 4, "pruner": "asha",
             "sampler": "random"}
    config = grpo_sweep(tmp_path, demo_dir, "study", sweep)
    run(tmp_path, "run", str(config))
    rewards, states, events = outcome(tmp_path / "runs" / "study")
    pruned = [event for event in events if event["kind"] == "optuna_pruned"]
    assert pruned and all(states[event["run_id"]] == "stopped" for event in pruned)
    best = max(rewards, key=rewards.get)
    assert best not in {event["run_id"] for event in pruned}
