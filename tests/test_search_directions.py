"""One table of metric directions (`config.directions`): validation accepts what each method can be ranked
by (GRPO's reward, DPO's reward accuracy and margins) and names it when a metric is not produced, and the
plan fills every sweep's direction from the metric's own (on main Optuna and PBT minimized by default)."""

from __future__ import annotations

import copy

import pytest

from finetune.config.directions import direction_of, sort_key
from finetune.plan.build import build_plan
from tests.conftest import BASE_SFT
from tests.helpers import doc_of, issues_of

GRPO = {"method": "grpo", "grpo_args": {"reward_functions": ["format_chat"]}, "training_args": {"learning_rate": 1e-4}}
DPO = {"method": "dpo", "training_args": {"learning_rate": 1e-4}}
RANGE = {"$list": [1e-4, 2e-4, 3e-4, 4e-4]}


def config_with(sweep: dict, **sections) -> dict:
    tree = copy.deepcopy(BASE_SFT)
    tree.update(copy.deepcopy(sections))
    tree["training_args"]["learning_rate"] = RANGE
    tree["sweep"] = sweep
    return tree


def planned_direction(tree: dict) -> str:
    return build_plan(doc_of(tree), train_examples=lambda config: 64).sweeps[0]["direction"]


@pytest.mark.parametrize("strategy", [{"strategy": "successive_halving", "num_runs": 2},
                                      {"strategy": "optuna", "num_runs": 2}, {"strategy": "pbt", "num_runs": 2}])
def test_grpo_by_reward_validates_and_maximizes_by_default(strategy) -> None:
    tree = config_with({**strategy, "metric": "reward"}, **GRPO)
    assert issues_of(tree) == []
    assert planned_direction(tree) == "maximize"


def test_a_grpo_sweep_by_a_metric_it_never_produces_is_refused_naming_reward() -> None:
    (issue,) = issues_of(config_with({"strategy": "successive_halving", "num_runs": 2}, **GRPO))  # eval_loss by default
    assert issue.path == "sweep.metric" and "eval_loss" in issue.message and "reward" in issue.allowed


def test_grpo_may_rank_by_one_reward_function_s_mean() -> None:
    assert issues_of(config_with({"strategy": "successive_halving", "num_runs": 2, "metric": "rewards/format_chat/mean"},
                                 **GRPO)) == []


@pytest.mark.parametrize("metric", ["rewards/accuracies", "rewards/margins", "eval_rewards/accuracies"])
def test_dpo_may_rank_by_its_reward_accuracy_and_margins(metric) -> None:
    tree = config_with({"strategy": "successive_halving", "num_runs": 2, "metric": metric}, **DPO)
    assert [issue for issue in issues_of(tree) if issue.path.startswith("sweep")] == []
    assert direction_of("dpo", {"eval_loss": "minimize"}, metric) == "maximize"


@pytest.mark.parametrize("strategy", ["optuna", "pbt", "successive_halving"])
def test_a_maximized_metric_is_maximized_when_direction_is_left_out(strategy) -> None:
    tree = config_with({"strategy": strategy, "num_runs": 2, "metric": "rouge_l"}, eval_conf={"metrics": ["eval_loss", "rouge_l"]})
    assert planned_direction(tree) == "maximize"


def test_a_direction_against_the_metric_s_is_refused_for_optuna_too() -> None:
    tree = config_with({"strategy": "optuna", "num_runs": 2, "metric": "rouge_l", "direction": "min"},
                       eval_conf={"metrics": ["eval_loss", "rouge_l"]})
    (issue,) = issues_of(tree)
    assert issue.path == "sweep.direction" and "leave sweep.direction out" in issue.allowed


def test_a_grid_can_say_what_to_rank_by() -> None:
    """On main sweep.metric was an unknown key for strategy grid."""
    tree = config_with({"strategy": "grid", "metric": "rouge_l", "rank_by": "best"}, eval_conf={"metrics": ["eval_loss", "rouge_l"]})
    assert issues_of(tree) == []
    assert planned_direction(tree) == "maximize"
    (issue,) = issues_of(config_with({"strategy": "grid", "metric": "bleu"}))
    assert issue.path == "sweep.metric"


def test_diverged_and_missing_values_sort_after_every_finite_one_in_both_directions() -> None:
    values = [float("nan"), 2.0, None, float("inf"), 1.0, float("-inf")]
    for direction, best in (("minimize", 1.0), ("maximize", 2.0)):
        ordered = sorted(values, key=lambda value: sort_key(value, direction))
        assert ordered[0] == best and ordered[-1] is None
        assert all(value is not None and value != value or value in (float("inf"), float("-inf")) for value in ordered[2:5])
