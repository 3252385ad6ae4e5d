"""A study heals from state.db (issue 30, item 2): optuna.db missing, damaged or not the plan's is rebuilt from
the runs' knobs and chunk values with a notice; nested knobs are conditional parameters; a run cloned by hand
does not count toward num_runs."""

from __future__ import annotations

import copy
import os

import pytest

from finetune.plan.model import RunPlan
from finetune.schedule.records import RunStatus

pytest.importorskip("optuna")

from finetune.search.study import OptunaSearch  # noqa: E402
from tests.test_optuna_search import CHUNKS, propose_one, record, result, tree  # noqa: E402

SWEEP = {"strategy": "optuna", "num_runs": 6, "max_concurrent_runs": 6, "seed": 7, "sampler": "random", "pruner": "none"}


def opened(root, space=None, **sweep) -> OptunaSearch:
    plan = RunPlan(experiment="t", output_dir=str(root), source="t.yaml", num_chunks=CHUNKS, sweeps=[{**SWEEP, **sweep}],
                   runs=[], search_spaces={0: space or tree()})
    return OptunaSearch.open(plan, 0, root)


def three_runs(root):
    search = opened(root, max_concurrent_runs=1)  # one trial asked per proposal: trials 0, 1, 2
    runs = [propose_one(search, []) for _ in range(3)]
    rows = []
    for index, run in enumerate(runs):
        for chunk in range(index + 1):
            value = 1.0 + index + chunk
            search.on_chunk(run, result(run, chunk + 1, {"eval_loss": value}), [])
            rows.append({"run_id": run.run_id, "chunk": chunk, "metrics": {"eval_loss": value}})
    runs[2].status = RunStatus.STOPPED
    return search, runs, rows


@pytest.mark.parametrize("damage", ["deleted", "random bytes", "truncated"])
def test_a_missing_or_damaged_study_is_rebuilt_from_state_db(tmp_path, damage) -> None:
    """On main: `KeyError: 'No trial with trial number 0'` (deleted) or an SQLAlchemy traceback (damaged)."""
    search, runs, rows = three_runs(tmp_path)
    params = [trial.params for trial in search.study.trials]
    path = tmp_path / "optuna.db"
    if damage == "deleted":
        path.unlink()
    elif damage == "random bytes":
        path.write_bytes(os.urandom(40_000))
    else:
        path.write_bytes(path.read_bytes()[:3000])
    again = opened(tmp_path)
    events = again.resume(runs, rows)
    assert [kind for kind, _ in events] == ["optuna_rebuilt"] and events[0][1]["trials"] == 3
    trials = again.study.trials
    assert [trial.params for trial in trials] == params
    assert [trial.state.name for trial in trials] == ["RUNNING", "RUNNING", "PRUNED"]
    assert trials[1].intermediate_values == {1: 2.0, 2: 3.0} and trials[0].user_attrs["run_id"] == runs[0].run_id
    if damage != "deleted":
        assert list(tmp_path.glob("optuna.db.damaged-*")), "the damaged file is set aside, not deleted"
    runs[0].status = RunStatus.COMPLETED
    again.on_status(runs[0])
    assert again.study.trials[0].state.name == "COMPLETE" and again.study.trials[0].value == 1.0
    assert [proposal.planned.trial for proposal in again.propose(runs)] == [3, 4, 5], "the next trials, none asked twice"


def test_an_intact_study_is_not_rebuilt(tmp_path) -> None:
    search, runs, rows = three_runs(tmp_path)
    assert [kind for kind, _ in opened(tmp_path, max_concurrent_runs=1).resume(runs, rows)] == []


def nested_space() -> dict:
    space = tree()
    space["peft_conf"] = {"$list": [
        {**copy.deepcopy(space["peft_conf"]), "peft_kwargs": {**space["peft_conf"]["peft_kwargs"], "r": {"$list": [4, 8]}}},
        {**copy.deepcopy(space["peft_conf"]), "peft_kwargs": {**space["peft_conf"]["peft_kwargs"], "r": {"$list": [16, 32]}}},
    ]}
    return space


def test_nested_knobs_whose_values_differ_are_conditional_parameters(tmp_path) -> None:
    """On main every run failed: "CategoricalDistribution does not support dynamic value space"."""
    search = opened(tmp_path, nested_space(), num_runs=8, max_concurrent_runs=1)  # one trial asked per proposal
    ranks = {propose_one(search, []).planned.config["peft_conf"]["peft_kwargs"]["r"] for _ in range(8)}
    assert ranks <= {4, 8, 16, 32} and len(ranks) >= 3
    names = {name for trial in search.study.trials for name in trial.params}
    assert "peft_conf" in names and len([name for name in names if name.startswith("peft_conf.peft_kwargs.r@")]) == 2


def test_a_run_cloned_by_hand_does_not_count_toward_num_runs(tmp_path) -> None:
    search = opened(tmp_path, num_runs=2, max_concurrent_runs=2)
    first = propose_one(search, [])
    clone = record(first.planned.model_copy(update={"run_id": "clone", "trial": None, "parent_run_id": first.run_id}))
    proposals = search.propose([first, clone])
    assert len(proposals) == 1, "the clone took neither a run nor a slot of the study"
