"""A plan on disk is the plan (issue 28): running an edited config against an existing experiment compares the
whole plan and refuses with a readable diff and the two ways forward. On main an edited Optuna config
silently continued the old study (other model, other range, other num_runs: all ignored)."""

from __future__ import annotations

import copy

import pytest

from finetune.plan.build import build_plan
from finetune.plan.compare import plan_differences
from finetune.schedule.preparation import ExperimentError, load_or_create_plan
from tests.conftest import BASE_SFT
from tests.helpers import doc_of


def study(**changes) -> dict:
    tree = copy.deepcopy(BASE_SFT)
    tree["training_args"]["learning_rate"] = {"$range": {"start": 1e-5, "end": 1e-3, "log": True}}
    tree["sweep"] = {"strategy": "optuna", "num_runs": 4}
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[last] = value
    return tree


def plan_of(tree: dict):
    return build_plan(doc_of(tree), train_examples=lambda config: 64)


def test_the_same_config_plans_the_same_experiment() -> None:
    assert plan_differences(plan_of(study()), plan_of(study())) == []


@pytest.mark.parametrize("path, value, said", [
    ("sweep.num_runs", 8, "sweep.num_runs: saved 4, now 8"),
    ("training_args.learning_rate", {"$range": {"start": 1e-4, "end": 1e-2, "log": True}}, "training_args.learning_rate.$range.end"),
    ("run_conf.model", "other/model", "run_conf.model: saved"),
    ("experiment.num_chunks", 3, "experiment.num_chunks: saved"),
])
def test_an_edited_study_is_refused_with_what_changed(tmp_path, path, value, said) -> None:
    saved = plan_of(study())
    (tmp_path / "plan.json").write_text(saved.model_dump_json())
    with pytest.raises(ExperimentError) as refused:
        load_or_create_plan(plan_of(study(**{path: value})), tmp_path, resume=False)
    message = str(refused.value)
    assert said in message
    assert "experiment.name another value" in message and f"finetune run --resume {tmp_path}" in message


def test_resume_keeps_the_saved_plan_whatever_the_config(tmp_path) -> None:
    saved = plan_of(study())
    (tmp_path / "plan.json").write_text(saved.model_dump_json())
    kept = load_or_create_plan(plan_of(study(**{"sweep.num_runs": 8})), tmp_path, resume=True)
    assert kept.sweeps[0]["num_runs"] == 4


def test_other_planned_runs_are_named() -> None:
    grid = copy.deepcopy(BASE_SFT)
    grid["training_args"]["learning_rate"] = {"$list": [1e-4, 2e-4]}
    wider = copy.deepcopy(grid)
    wider["training_args"]["learning_rate"] = {"$list": [1e-4, 2e-4, 3e-4]}
    lines = plan_differences(plan_of(grid), plan_of(wider))
    assert any(line.startswith("runs in the config, not saved: ") for line in lines)
