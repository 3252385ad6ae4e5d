"""Hostile configs: unknown YAML tags, non-finite numbers, names that leave their folder, special files,
values that are not what their field says. Each is refused with its key path and file position."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.loading import ConfigLoadError, load_document, parse_yaml_text
from finetune.config.validation import validate_concrete, validate_document
from tests.conftest import BASE_SFT

runner = CliRunner()


def edited(path: str, value: Any, tree: dict[str, Any] | None = None) -> dict[str, Any]:
    tree = copy.deepcopy(tree or BASE_SFT)
    *parents, last = path.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return tree


MARK = "__RAW__"


def yaml_with(path: str, raw: str, tree: dict[str, Any] | None = None) -> str:
    """The config as YAML flow text with `raw` (YAML source, e.g. `.inf`) written at `path`."""
    return json.dumps(edited(path, MARK, tree)).replace(f'"{MARK}"', raw)


def issues_at(text: str, path: str) -> list:
    issues = validate_document(parse_yaml_text(text, "test.yaml"))
    return [issue for issue in issues if issue.path == path]


# ---------------------------------------------------------------- 1. YAML tags

TAGGED = [
    ("python call on a sequence", "a:\n  b: !!python/object/apply:os.system [echo hi]\n", "2:6", "a.b", "!!python/object/apply:os.system"),
    ("python object on a mapping", "a:\n  b: !!python/object/new:collections.OrderedDict {x: 1}\n", "2:6", "a.b", "!!python/object/new"),
    ("python name on a scalar", "a: [1, !!python/name:os.system '']\n", "1:8", "a[1]", "!!python/name:os.system"),
    ("custom tag on a scalar", "a: {b: !secret x}\n", "1:8", "a.b", "!secret"),
    ("custom tag on a mapping", "a: !thing {b: 1}\n", "1:4", "a", "!thing"),
    ("binary", "a: !!binary aGk=\n", "1:4", "a", "!!binary"),
    ("set", "a: !!set {x}\n", "1:4", "a", "!!set"),
    ("tag on the whole document", "!!python/object/apply:os.system [ls]\n", "1:1", "<root>", "!!python/object/apply"),
    ("tag on a key", "a:\n  !!python/str k: 1\n", "2:3", "a", "!!python/str"),
    ("inside a !list", "a: !list [1, !!python/object/apply:os.getcwd []]\n", "1:14", "a[1]", "!!python/object/apply"),
    ("inside a !range", "a: !range {start: !!python/float 1, end: 2}\n", "1:19", "a.start", "!!python/float"),
    ("a merged mapping", "b: &b {x: 1}\nc: {<<: !!python/object/new:dict {y: 2}}\n", "2:9", "c", "!!python/object/new:dict"),
    ("a merged list", "c: {<<: !!python/tuple [{y: 2}]}\n", "1:9", "c", "!!python/tuple"),
]


@pytest.mark.parametrize("name,text,position,path,tag", TAGGED, ids=[case[0] for case in TAGGED])
def test_unknown_tags_anywhere_are_refused_with_file_line_and_path(name, text, position, path, tag) -> None:
    with pytest.raises(ConfigLoadError) as raised:
        parse_yaml_text(text, "f.yaml")
    assert str(raised.value).startswith(f"f.yaml:{position}: {path}: unknown YAML tag {tag}"), str(raised.value)


def test_a_tag_in_a_helm_values_file_is_refused_even_outside_the_config_key(tmp_path) -> None:
    path = tmp_path / "values.yaml"
    path.write_text("image: !!python/object/apply:os.system [ls]\nfinetuning: {}\n")
    with pytest.raises(ConfigLoadError, match=r"values.yaml:1:8: image: unknown YAML tag"):
        load_document(path, values_key="finetuning")
    path.write_text("finetuning:\n  run_conf: !!python/object/new:dict {model: x}\n")
    with pytest.raises(ConfigLoadError, match=r"values.yaml:2:13: finetuning.run_conf: unknown YAML tag"):
        load_document(path, values_key="finetuning")


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system [ls]", "[1, !custom 2]", "{a: !!python/none ''}"])
def test_a_tag_in_a_set_value_is_refused_naming_the_key(tmp_path, value) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(BASE_SFT))
    with pytest.raises(ConfigLoadError, match=r"^--set run_conf.model_args:1:\d+: run_conf.model_args(\[1\]|\.a)?: unknown YAML tag"):
        load_document(path, overrides=[f"run_conf.model_args={value}"])
    result = runner.invoke(app, ["validate", str(path), "--set", f"run_conf.model_args={value}"])
    assert result.exit_code == 2 and "unknown YAML tag" in result.output


def test_the_projects_own_tags_and_plain_types_still_read() -> None:
    text = "a: !list [1, !!int '2', !!str 3]\nb: !range {start: !!float 1, end: 2}\nc: !!map {d: !!null ''}\ne: =\n"
    assert parse_yaml_text(text, "f").tree == {"a": {"$list": [1, 2, "3"]}, "b": {"$range": {"start": 1.0, "end": 2}},
                                               "c": {"d": None}, "e": "="}


@settings(max_examples=80, deadline=None)
@given(tag=st.one_of(st.from_regex(r"![a-z]{1,8}", fullmatch=True), st.from_regex(r"!!python/[a-z/:.]{1,20}", fullmatch=True)),
       body=st.sampled_from(["1", "x", "[1, 2]", "{a: 1}", "''"]))
def test_no_unknown_tag_is_ever_ignored(tag, body) -> None:
    if tag in ("!list", "!range"):
        return
    with pytest.raises(ConfigLoadError, match="unknown YAML tag"):
        parse_yaml_text(f"k:\n  v: {tag} {body}\n", "f")


# ---------------------------------------------------------------- 2. finite numbers

NON_FINITE = [".inf", "-.inf", ".nan", "1e400", "-1e400"]
RANDOM = {"sweep": {"strategy": "random", "num_runs": 2}}
NUMBER_PLACES = [
    ("training_args.learning_rate", None),
    ("training_args.num_train_epochs", None),
    ("training_args.max_grad_norm", None),
    ("overrides.lr_multiplier", None),
    ("peft_conf.peft_kwargs.lora_dropout", None),
    ("run_conf.model_args.some_extra_kwarg", None),  # typed Any: only the walk catches it
    ("training_args.learning_rate.$list.1", {"training_args": {"learning_rate": {"$list": [1e-4, 0]}}}),
    ("training_args.learning_rate.$range.end", {**RANDOM, "training_args": {"learning_rate": {"$range": {"start": 1e-5, "end": 1}}}}),
]


def _tree_for(overlay: dict[str, Any] | None) -> dict[str, Any]:
    from finetune.config.validation import deep_merge

    return deep_merge(copy.deepcopy(BASE_SFT), overlay) if overlay else copy.deepcopy(BASE_SFT)


@pytest.mark.parametrize("raw", NON_FINITE)
@pytest.mark.parametrize("path,overlay", NUMBER_PLACES, ids=[case[0] for case in NUMBER_PLACES])
def test_non_finite_numbers_are_refused_with_path_line_and_what_is_allowed(path, overlay, raw) -> None:
    text = yaml_with(path, raw, _tree_for(overlay))
    issues = validate_document(parse_yaml_text(text, "test.yaml"))
    shown = path.replace(".$list.", "[").replace(".$range", "")
    shown = shown + "]" if "[" in shown else shown
    matching = [issue for issue in issues if issue.path == shown]
    assert matching, [str(issue) for issue in issues]
    assert matching[0].location.startswith("test.yaml:1:")
    assert "finite" in f"{matching[0].message} {matching[0].allowed}"


def test_a_non_finite_set_value_is_refused_at_its_set(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(BASE_SFT))
    doc = load_document(path, overrides=["training_args.num_train_epochs=.inf"])
    issues = validate_document(doc)
    assert [(issue.path, issue.location) for issue in issues] == [("training_args.num_train_epochs", "--set training_args.num_train_epochs")]
    result = runner.invoke(app, ["plan", str(path), "--set", "training_args.learning_rate=.inf", "--json"])
    assert result.exit_code == 1 and "not a finite number" in result.output


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf"), 10**30])
def test_validate_concrete_refuses_what_validate_refuses(value) -> None:
    config, issues = validate_concrete(edited("training_args.seed" if isinstance(value, int) else "training_args.learning_rate", value),
                                       lambda path: "clone")
    assert config is None and len(issues) == 1 and issues[0].path.startswith("training_args.")
    assert "finite" in f"{issues[0].message} {issues[0].allowed}" or "64 bits" in str(issues[0].allowed)


def test_an_infinite_learning_rate_never_reaches_a_plan() -> None:
    from finetune.config.validation import ConfigInvalid
    from finetune.plan.build import build_plan

    with pytest.raises(ConfigInvalid, match="not a finite number"):
        build_plan(parse_yaml_text(yaml_with("training_args.learning_rate", ".inf"), "t.yaml"), train_examples=lambda c: 8)


# ---------------------------------------------------------------- 3. names that become paths

BAD_NAMES = ["../../../x", "/etc/cron.d/x", "a/b", "a\\b", "..", ".", "", "x\0y", "n" * 101, "has space", ".hidden"]
NAME_KEYS = [("run_conf.final_checkpoint_name", "sft"), ("sft_args.save_name_if_new_basemodel", "sft"),
             ("dpo_args.save_name_if_new_basemodel", "dpo"), ("experiment.name", "sft")]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("key,method", NAME_KEYS)
def test_names_that_become_paths_stay_inside_their_folder(key, method, name) -> None:
    tree = edited(key, name, edited("method", method))
    issues = [issue for issue in validate_document(parse_yaml_text(json.dumps(tree), "test.yaml")) if issue.path == key]
    assert issues, f"{key}={name!r} was accepted"
    assert "file or folder name" in issues[0].message and "pattern" in issues[0].allowed
    assert issues[0].location.startswith("test.yaml:1:")


@pytest.mark.parametrize("name", ["checkpoint-final-adapter", "a..b", "run_1.v2", "n" * 100])
def test_plain_names_are_fine(name) -> None:
    assert validate_document(parse_yaml_text(json.dumps(edited("run_conf.final_checkpoint_name", name)), "t")) == []


# ---------------------------------------------------------------- 4. data paths that are no regular file


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("key", ["data_conf.training_data.datasets.0.path", "data_conf.validation_data"])
def test_a_device_or_fifo_data_path_is_refused_by_validate(fifo, key) -> None:
    for special, words in ((str(fifo), "named pipe"), ("/dev/zero", "character device")):
        value = {"type": "CONCATENATION", "datasets": [{"path": special}]} if key.endswith("validation_data") else special
        tree = edited(key, value)
        issues = [issue for issue in validate_document(parse_yaml_text(json.dumps(tree), "t.yaml")) if issue.path.endswith("path")]
        assert issues and words in issues[0].message and "regular file" in issues[0].allowed, issues


def _finishes(function, *args) -> BaseException | None:
    """Run `function` in a thread; it must end (with an exception) within a few seconds."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            function(*args)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(5)
    assert outcome, f"{function.__name__} blocked"
    return outcome[0]


def test_readers_and_hashing_refuse_a_fifo_without_blocking(fifo) -> None:
    from finetune.data.mixing import count_jsonl_records
    from finetune.data.pipeline import _file_digest
    from finetune.data.readers import DataError, read_records

    error = _finishes(read_records, fifo, "sft")
    assert isinstance(error, DataError) and "named pipe" in str(error) and str(fifo) in str(error)
    assert isinstance(_finishes(_file_digest, fifo), OSError)
    assert _finishes(count_jsonl_records, fifo) is None


def test_reading_or_hashing_a_device_is_refused() -> None:
    from finetune.data.pipeline import _file_digest
    from finetune.data.readers import DataError, read_records

    assert isinstance(_finishes(read_records, "/dev/zero", "sft"), DataError)
    assert isinstance(_finishes(_file_digest, Path("/dev/zero")), OSError)


# ---------------------------------------------------------------- 8. strict values


@pytest.mark.parametrize("path,value", [
    ("experiment.threads_per_worker", True), ("experiment.runs_per_device", "2"), ("experiment.num_chunks", "4"),
    ("batchsize_conf.total_train_batch_size", "8"), ("batchsize_conf.max_per_device_train_batch_size", 4.0),
    ("run_conf.model_args.low_cpu_mem_usage", "yes"), ("sft_args.max_seq_length", True), ("experiment.devices", ["0"]),
])
def test_values_are_not_coerced(path, value) -> None:
    issues = validate_document(parse_yaml_text(json.dumps(edited(path, value)), "t.yaml"))
    assert [issue.path for issue in issues] == [path]


@pytest.mark.parametrize("text", ["Infinity", "inf", "+inf", "1e999"])
def test_a_text_that_a_number_field_reads_as_non_finite_is_refused(text) -> None:
    """("nan" and "-inf" are refused by the field's own bounds.)"""
    config, issues = validate_concrete(edited("training_args.max_grad_norm", text), lambda path: "clone")
    assert config is None and [(issue.path, issue.message, issue.given) for issue in issues] == [
        ("training_args.max_grad_norm", "reads as a number that is not finite", repr(text))]


@pytest.mark.parametrize("name", ["chunk-3", "checkpoint-merged", ".hidden"])
def test_a_final_checkpoint_name_that_finetune_writes_itself_is_refused(name) -> None:
    config, issues = validate_concrete(edited("run_conf.final_checkpoint_name", name), lambda path: "test")
    assert config is None and [issue.path for issue in issues] == ["run_conf.final_checkpoint_name"]
