"""Sweep expansion, derived values and the plan command."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.knobs import RangeKnob
from finetune.config.loading import parse_yaml_text
from finetune.config.validation import ConfigInvalid
from finetune.plan.build import PlanError, build_plan, run_id_of
from finetune.plan.derive import DeriveError, chunk_steps, effective_learning_rate, split_batch_size
from finetune.plan.model import RunPlan
from tests.conftest import BASE_SFT, EXAMPLES
from tests.helpers import doc_of


def plan_of(tree, sizes=100):
    return build_plan(doc_of(tree), train_examples=lambda config: sizes)


def test_grid_count_is_the_product_of_list_sizes(base_config) -> None:
    base_config["training_args"]["learning_rate"] = {"$list": [1e-4, 2e-4, 3e-4]}
    base_config["peft_conf"]["peft_kwargs"]["r"] = {"$list": [4, 8]}
    base_config["data_conf"]["chat_template_name"] = {"$list": ["chat-ml", "poro"]}
    plan = plan_of(base_config)
    assert len(plan.runs) == 12
    assert len({run.run_id for run in plan.runs}) == 12
    assert {(run.knobs["peft_conf.peft_kwargs.r"], run.knobs["training_args.learning_rate"]) for run in plan.runs} == {
        (r, lr) for r in (4, 8) for lr in (1e-4, 2e-4, 3e-4)
    }


def test_list_of_sub_configs_with_nested_knobs(base_config) -> None:
    base_config["peft_conf"] = {
        "$list": [
            {"peft_type": "NO_PEFT"},
            {"peft_type": "LORA", "peft_kwargs": {"r": {"$list": [4, 8]}}},
        ]
    }
    plan = plan_of(base_config)
    assert [run.label for run in plan.runs] == ["peft_conf=#0", "peft_conf=#1,r=4", "peft_conf=#1,r=8"]


def random_config(base_config, num_runs=5, seed=3):
    base_config["sweep"] = {"strategy": "random", "num_runs": num_runs, "seed": seed}
    base_config["training_args"]["learning_rate"] = {"$range": {"start": 1e-5, "end": 1e-2, "log": True}}
    base_config["peft_conf"]["peft_kwargs"]["r"] = {"$list": [4, 8, 16]}
    return base_config


def test_random_plans_are_reproducible_and_distinct(base_config) -> None:
    tree = random_config(base_config)
    first, again = plan_of(tree), plan_of(copy.deepcopy(tree))
    assert [run.run_id for run in first.runs] == [run.run_id for run in again.runs]
    assert len({run.run_id for run in first.runs}) == 5
    other = plan_of(random_config(copy.deepcopy(BASE_SFT), seed=4))
    assert [run.run_id for run in other.runs] != [run.run_id for run in first.runs]
    for run in first.runs:
        assert 1e-5 <= run.knobs["training_args.learning_rate"] <= 1e-2
        assert run.knobs["peft_conf.peft_kwargs.r"] in (4, 8, 16)


def test_random_plan_ignores_key_order(base_config) -> None:
    tree = random_config(base_config)
    reordered = json.loads(json.dumps({key: tree[key] for key in reversed(list(tree))}))
    reordered["training_args"] = dict(reversed(list(reordered["training_args"].items())))
    assert [r.run_id for r in plan_of(tree).runs] == [r.run_id for r in plan_of(reordered).runs]


def test_space_smaller_than_num_runs_is_a_clear_error(base_config) -> None:
    base_config["sweep"] = {"strategy": "random", "num_runs": 5}
    base_config["peft_conf"]["peft_kwargs"]["r"] = {"$list": [4, 8]}
    with pytest.raises(PlanError, match="only 2 distinct combination"):
        plan_of(base_config)


def test_invalid_combination_names_its_knobs(base_config) -> None:
    base_config["method"] = {"$list": ["sft", "dpo"]}
    with pytest.raises(ConfigInvalid):
        plan_of(base_config)


def test_run_ids_are_stable_and_change_with_any_value() -> None:
    config = copy.deepcopy(BASE_SFT)
    reordered = json.loads(json.dumps(dict(reversed(list(config.items())))))
    assert run_id_of(config) == run_id_of(reordered)
    changed = copy.deepcopy(config)
    changed["training_args"]["learning_rate"] = 1.1e-4
    assert run_id_of(changed) != run_id_of(config)


@pytest.mark.parametrize(
    "total,max_per_device,processes,expected",
    [
        (8, 8, 1, (8, 1)),
        (8, 4, 1, (4, 2)),
        (12, 5, 1, (4, 3)),
        (7, 2, 1, (1, 7)),
        (64, 8, 4, (8, 2)),
        (32, 3, 2, (2, 8)),
        (6, 4, 3, (2, 1)),
    ],
)
def test_batch_size_split(total, max_per_device, processes, expected) -> None:
    per_device, accumulation = split_batch_size(total, max_per_device, processes)
    assert (per_device, accumulation) == expected
    assert per_device * accumulation * processes == total and per_device <= max_per_device


@pytest.mark.parametrize("total,processes,options", [(10, 4, "8, 12"), (3, 2, "2, 4"), (1, 2, "2")])
def test_impossible_batch_split_says_what_works(total, processes, options) -> None:
    with pytest.raises(DeriveError, match=f"totals that work: {options}"):
        split_batch_size(total, 4, processes)


def test_learning_rate_scaling_by_hand() -> None:
    assert effective_learning_rate(1e-4, 1.0, "none", 64) == pytest.approx(1e-4)
    assert effective_learning_rate(1e-4, 0.5, "sqrt", 64) == pytest.approx(1e-4 * 0.5 * 8)
    assert effective_learning_rate(2e-5, 2.0, "linear", 16) == pytest.approx(2e-5 * 2 * 16)


def test_derived_values_in_plan(base_config) -> None:
    base_config["overrides"] = {"num_train_epochs": 2, "lr_multiplier": 0.5, "lr_batch_size_scaling": "sqrt"}
    run = plan_of(base_config, sizes=100).runs[0]
    derived = run.derived
    assert (derived.per_device_train_batch_size, derived.gradient_accumulation_steps) == (4, 2)
    assert derived.learning_rate == pytest.approx(1e-4 * 0.5 * math.sqrt(8))
    assert derived.steps_per_epoch == 13 and derived.total_steps == 26
    assert derived.chunk_steps == [7, 7, 7, 5]


@given(total=st.integers(1, 5000), chunks=st.integers(1, 64))
def test_chunks_cover_every_step_once(total, chunks) -> None:
    steps = chunk_steps(total, chunks)
    assert sum(steps) == total and all(step >= 1 for step in steps)
    assert len(steps) <= chunks
    assert all(step == steps[0] for step in steps[:-1]) and steps[-1] <= steps[0]


# ---------------------------------------------------------------- properties on random knob trees

knob_fields = {
    ("training_args", "learning_rate"): st.floats(1e-6, 1e-2),
    ("training_args", "weight_decay"): st.floats(0.0, 0.5),
    ("training_args", "seed"): st.integers(0, 1000),
    ("peft_conf", "peft_kwargs", "r"): st.integers(1, 64),
    ("peft_conf", "peft_kwargs", "lora_dropout"): st.floats(0.0, 0.5),
}


@st.composite
def knob_trees(draw):
    tree = copy.deepcopy(BASE_SFT)
    tree["sweep"] = {"strategy": "random", "num_runs": draw(st.integers(1, 4)), "seed": draw(st.integers(0, 99))}
    candidates = {}
    for path in draw(st.lists(st.sampled_from(sorted(knob_fields)), min_size=1, max_size=4, unique=True)):
        values = draw(st.lists(knob_fields[path], min_size=2, max_size=4, unique=True))
        if draw(st.booleans()) and isinstance(values[0], float):
            knob = {"$range": {"start": min(values), "end": max(values)}}
            if knob["$range"]["start"] == knob["$range"]["end"]:
                continue
        else:
            knob = {"$list": values}
        node = tree
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = knob
        candidates[".".join(path)] = knob
    return tree, candidates


@settings(max_examples=60, deadline=None)
@given(case=knob_trees())
def test_every_planned_value_is_a_candidate_or_in_range(case) -> None:
    tree, candidates = case
    try:
        plan = plan_of(tree)
    except PlanError as error:
        assert "distinct combination" in str(error)
        return
    for run in plan.runs:
        assert RunPlan.model_validate(plan.model_dump()).run(run.run_id) == run
        for path, value in run.knobs.items():
            knob = candidates[path]
            if "$list" in knob:
                assert value in knob["$list"]
            else:
                assert RangeKnob.model_validate(knob["$range"]).contains(value)


def test_plan_command_table_and_json(demo_project, monkeypatch) -> None:
    monkeypatch.chdir(demo_project)
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(EXAMPLES / "sft-lora-grid.yaml")])
    assert result.exit_code == 0, result.output
    assert "4 run(s)" in result.output
    as_json = runner.invoke(app, ["plan", str(EXAMPLES / "sft-lora-grid.yaml"), "--json"])
    plan = RunPlan.model_validate_json(as_json.stdout)
    assert len(plan.runs) == 4 and {run.knobs["peft_conf.peft_kwargs.r"] for run in plan.runs} == {4, 16}


def test_plan_counts_examples_from_files(tmp_path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": []}) for _ in range(40)) + "\n\n")
    tree = copy.deepcopy(BASE_SFT)
    tree["data_conf"]["training_data"]["datasets"] = [{"path": str(data)}]
    plan = build_plan(parse_yaml_text(json.dumps(tree), "t.yaml"))
    assert plan.runs[0].derived.train_examples == 30  # 40 minus a 0.25 auto split
    assert plan.runs[0].derived.total_steps == 4
