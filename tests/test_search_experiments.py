"""Searches that add runs while the experiment trains, end to end on the demo model (CPU): an Optuna study with
pruning, killed and resumed; population-based training with warm-started clones."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.helpers import state_db
from tests.test_training import chunk_rows, demo_config, finetune, small, start_experiment, states

pytestmark = pytest.mark.slow


def events(root: Path, kind: str) -> list[tuple[str | None, dict, float]]:
    with state_db(root) as db:
        rows = db.execute("SELECT run_id, detail, at FROM events WHERE kind = ? ORDER BY id", (kind,)).fetchall()
    return [(run_id, json.loads(detail), at) for run_id, detail, at in rows]


def trials(root: Path, study: str) -> list:
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'optuna.db'}")
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials()
    finally:
        storage.remove_session()
        storage.engine.dispose()


def wait_for_completed_run(root: Path, process, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (root / "state.db").is_file() and "completed" in states(root).values():
                return
        except sqlite3.OperationalError:
            pass  # the controller has created state.db but not its tables yet
        assert process.poll() is None, "the experiment ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError("timed out waiting for a completed run")


def test_an_optuna_study_with_pruning_survives_sigkill_and_resumes_the_same_study(tmp_path, demo_dir) -> None:
    pytest.importorskip("optuna")
    config = demo_config(tmp_path, demo_dir, "sft-optuna.yaml", "study")
    args = ["run", str(config), *small("study", steps=6, chunks=3), "--set", "sweep.num_runs=4",
            "--set", "sweep.max_concurrent_runs=2", "--set", "sweep.startup_runs=1", "--set", "sweep.pruner=successive_halving"]
    root = tmp_path / "runs" / "study"
    process = start_experiment(tmp_path, args)
    wait_for_completed_run(root, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = time.time()
    done_before = {run for run, state in states(root).items() if state in ("completed", "stopped")}

    finetune(tmp_path, *args)  # running the same config again resumes the experiment
    final = states(root)
    assert len(final) == 4 and set(final.values()) <= {"completed", "stopped"}
    found = trials(root, "study-group0")
    by_run = {trial.user_attrs["run_id"]: trial for trial in found if "run_id" in trial.user_attrs}
    assert set(by_run) == set(final), "every run is one trial of the same study, and every trial's run is a run"
    assert all(trial.state.name == "FAIL" for trial in found if trial.user_attrs.get("run_id") not in final)
    planned = {run["run_id"]: run["trial"] for run in json.loads((root / "plan.json").read_text())["runs"]}
    assert {run: trial.number for run, trial in by_run.items()} == planned
    for run, state in final.items():
        trial = by_run[run]
        assert trial.state.name == ("COMPLETE" if state == "completed" else "PRUNED")
        assert sorted(trial.intermediate_values) == list(range(1, len(trial.intermediate_values) + 1))
    pruned = {run for run, _, _ in events(root, "optuna_pruned")}
    assert pruned == {run for run, state in final.items() if state == "stopped"}
    restarted = {run for run, detail, at in events(root, "chunk_started") if at > killed_at}
    assert not restarted & done_before, "a run that had ended before the kill never trains again"
    assert len(chunk_rows(root)) == len(set(chunk_rows(root)))
    report = finetune(tmp_path, "report", str(root)).stdout
    assert "trial 0" in report


def test_population_based_training_replaces_the_worst_runs_by_warm_clones_of_the_best(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-pbt.yaml", "pbt")
    finetune(tmp_path, "run", str(config), *small("pbt", steps=8, chunks=4), "--set", "sweep.quantile_fraction=0.5")
    root = tmp_path / "runs" / "pbt"
    final = states(root)
    exploits = events(root, "pbt_exploit")
    added = {run: detail for run, detail, _ in events(root, "search_added")}
    assert exploits, "no run was replaced"
    plan = {run["run_id"]: run for run in json.loads((root / "plan.json").read_text())["runs"]}
    with state_db(root) as db:
        parents = dict(db.execute("SELECT run_id, parent_run_id FROM runs").fetchall())
    replacements = 0
    for replaced, detail, _ in exploits:
        clones = [run for run, info in added.items() if info["replaces"] == replaced]
        if not clones:  # rejected (the events say why): the run goes on
            continue
        replacements += 1
        (clone,) = clones
        assert final[replaced] == "stopped"
        assert parents[clone] == detail["parent"] == added[clone]["parent"]
        assert plan[clone]["warm_start"] and plan[clone]["config"]["peft_conf"]["peft_type"] == "PRETRAINED_PEFT"
        assert final[clone] in ("completed", "stopped")
    assert replacements and len([run for run, parent in parents.items() if parent]) == replacements
    report = finetune(tmp_path, "report", str(root)).stdout
    assert "pbt_exploit" in report and "Lineage" in (root / "report.md").read_text()
    from finetune.dashboard.views import runs_view

    shown = {run["run_id"]: run["lineage"] for run in runs_view(root)["runs"]}
    assert all(shown[run] == ([parent] if parent else []) for run, parent in parents.items() if parent is None or parents[parent] is None)
