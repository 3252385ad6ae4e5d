"""Limits found before any memory grows: runs per sweep and experiment, knobs, batch sizes, steps, epochs,
chunks, mix weights, data too small to split; each refused with a clear error, and quickly."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from finetune.config.loading import parse_yaml_text
from finetune.config.validation import ConfigInvalid, deep_merge, validate_document
from finetune.plan.build import PlanError, build_plan
from finetune.plan.derive import split_batch_size
from finetune.plan.render import plan_summary
from tests.conftest import BASE_SFT
from tests.helpers import doc_of, issues_of

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def config(overlay: dict[str, Any]) -> dict[str, Any]:
    return deep_merge(copy.deepcopy(BASE_SFT), overlay)


def lists(count: int, size: int) -> dict[str, Any]:
    """`count` $list knobs of `size` candidates each (a grid of size**count runs)."""
    floats = {"$list": [index / 100 for index in range(size)]}
    ints = {"$list": list(range(size))}
    keys = {"weight_decay": floats, "max_grad_norm": floats, "seed": ints, "data_seed": ints, "warmup_steps": ints}
    return {"training_args": dict(list(keys.items())[:count])}


def issues_of_yaml(tree: dict[str, Any]) -> list:
    """Issues of the tree written as YAML, where a float('inf') is `.inf` (JSON would write a string)."""
    text = json.dumps(tree).replace("-Infinity", "-.inf").replace("Infinity", ".inf").replace("NaN", ".nan")
    return validate_document(parse_yaml_text(text, "test.yaml"))


def test_a_grid_of_20_to_the_5_is_refused_before_expanding() -> None:
    tree = config(lists(5, 20))
    started = time.perf_counter()
    issues = issues_of(tree)
    assert [issue.path for issue in issues] == ["sweep"]
    assert "3,200,000 runs" in issues[0].message and "20 x 20 x 20 x 20 x 20" in issues[0].message
    assert "max_runs" in issues[0].message and "random" in issues[0].allowed
    with pytest.raises(ConfigInvalid, match="more than sweep.max_runs"):
        build_plan(doc_of(tree), train_examples=lambda c: 64)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("max_runs,ok", [(11, False), (12, True)])
def test_max_runs_is_configurable(max_runs, ok) -> None:
    tree = config({**lists(1, 12), "sweep": {"max_runs": max_runs}})
    assert (issues_of(tree) == []) is ok
    if ok:
        assert len(build_plan(doc_of(tree), train_examples=lambda c: 64).runs) == 12


@pytest.mark.parametrize("num_runs,words", [(10**5, "more than sweep.max_runs 10000"), (10**9, "less than or equal to 100000")])
def test_num_runs_is_bounded(num_runs, words) -> None:
    issues = issues_of(config({"sweep": {"strategy": "random", "num_runs": num_runs}, **lists(1, 3)}))
    assert [issue.path for issue in issues] == ["sweep.num_runs"] and words in issues[0].message


def test_max_runs_has_a_ceiling() -> None:
    issues = issues_of(config({"sweep": {"max_runs": 10**9}}))
    assert [issue.path for issue in issues] == ["sweep.max_runs"]


def test_groups_together_are_bounded_by_the_top_level_max_runs() -> None:
    group = {"sweep": {"strategy": "random", "num_runs": 6000}, "training_args": {"seed": {"$list": list(range(7000))}}}
    issues = issues_of(config({"groups": [group, group]}))
    assert [issue.path for issue in issues] == ["groups"]
    assert "12,000 runs in all" in issues[0].message and "groups[1]: 6,000" in issues[0].message


def test_too_many_knobs_are_refused() -> None:
    tree = config({"run_conf": {"model_args": {f"k{index}": {"$list": [1]} for index in range(101)}}})
    issues = issues_of(tree)
    assert len(issues) == 1 and "101 knobs, more than 100" in issues[0].message


BOUNDED = [
    ("batchsize_conf.total_train_batch_size", 10**12),
    ("batchsize_conf.max_per_device_train_batch_size", 10**6),
    ("batchsize_conf.per_device_eval_batch_size", 10**6),
    ("training_args.max_steps", 10**9),
    ("training_args.num_train_epochs", 1e5),
    ("overrides.num_train_epochs", 1e5),
    ("experiment.num_chunks", 10**9),
    ("data_conf.training_data", {"type": "PRECOMPUTE_WEIGHTED_MIX", "datasets": [{"path": "a.jsonl", "sampling_weight": 1e7}]}),
]


@pytest.mark.parametrize("path,value", BOUNDED, ids=[case[0] for case in BOUNDED])
def test_sizes_beyond_sane_ranges_are_refused(path, value) -> None:
    *parents, last = path.split(".")
    tree = copy.deepcopy(BASE_SFT)
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    issues = issues_of(tree)
    assert len(issues) == 1 and issues[0].path.startswith(path), [str(issue) for issue in issues]
    assert "less than or equal" in issues[0].message


def mix(*weights: Any) -> dict[str, Any]:
    datasets = [{"path": f"d{index}.jsonl", "sampling_weight": weight} for index, weight in enumerate(weights)]
    return config({"data_conf": {"training_data": {"type": "PRECOMPUTE_WEIGHTED_MIX", "datasets": datasets}}})


@pytest.mark.parametrize("weights,path,words", [
    ((1.0, 1e-12), "data_conf.training_data.datasets", "more than a factor of 1000"),
    ((1.0, 0.0), "data_conf.training_data.datasets[1].sampling_weight", "greater than 0"),
    ((1.0, -1.0), "data_conf.training_data.datasets[1].sampling_weight", "greater than 0"),
    ((1.0, float("inf")), "data_conf.training_data.datasets[1].sampling_weight", "finite"),
    ((float("nan"), 1.0), "data_conf.training_data.datasets[0].sampling_weight", "finite"),
])
def test_mix_weights_are_finite_positive_and_close(weights, path, words) -> None:
    issues = issues_of_yaml(mix(*weights))
    assert [issue.path for issue in issues] == [path]
    assert words in f"{issues[0].message} {issues[0].allowed}"


def write_jsonl(path: Path, records: int) -> str:
    path.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(records)))
    return str(path)


@pytest.mark.parametrize("records,words", [(0, "has no records"), (1, "which has 1 record(s); it needs at least 2")])
def test_auto_split_of_a_tiny_file_names_the_file(tmp_path, records, words) -> None:
    tree = copy.deepcopy(BASE_SFT)
    tree["data_conf"]["training_data"]["datasets"] = [{"path": write_jsonl(tmp_path / "tiny.jsonl", records)}]
    with pytest.raises(PlanError, match="tiny.jsonl") as raised:
        build_plan(doc_of(tree))
    assert words in str(raised.value)


def test_a_mix_that_would_explode_is_refused_at_plan_time_naming_its_file(tmp_path) -> None:
    tree = mix(1000.0, 1.0)
    tree["data_conf"]["validation_data"] = {"type": "NONE"}
    for index, size in enumerate((2, 20_000)):
        tree["data_conf"]["training_data"]["datasets"][index]["path"] = write_jsonl(tmp_path / f"d{index}.jsonl", size)
    started = time.perf_counter()
    with pytest.raises(PlanError, match=r"d1.jsonl.*the limit is 10,000,000"):
        build_plan(doc_of(tree))
    assert time.perf_counter() - started < 5


def test_a_large_prime_batch_splits_at_once() -> None:
    started = time.perf_counter()
    assert split_batch_size(999_983, 1) == (1, 999_983)
    assert split_batch_size(10**12 + 39, 1) == (1, 10**12 + 39)
    assert time.perf_counter() - started < 5


def test_a_knob_on_an_experiment_wide_key_in_a_group_is_reported_once() -> None:
    issues = issues_of(config({"groups": [{"experiment": {"name": {"$list": ["a", "b"]}}}]}))
    assert [issue.path for issue in issues] == ["groups[0].experiment.name"]


def test_the_plan_summary_shows_each_groups_chunks() -> None:
    tree = config({"groups": [{"experiment": {"num_chunks": 2}}, {"training_args": {"seed": 1}}]})
    assert validate_document(doc_of(tree)) == []
    summary = plan_summary(build_plan(doc_of(tree), train_examples=lambda c: 64))
    assert "chunks per run: group 0 2, group 1 4" in summary
    assert "4 chunk(s) per run" in plan_summary(build_plan(doc_of(BASE_SFT), train_examples=lambda c: 64))
