"""A corpus of broken configs: each fails in pydantic and in the JSON Schema, naming the path."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest

from tests.conftest import BASE_SFT
from tests.helpers import issues_of, schema_errors


def broken(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    tree = copy.deepcopy(BASE_SFT)
    edit(tree)
    return tree


def set_path(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(tree: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = tree
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(last) if last.isdigit() else last] = value

    return edit


def drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(tree: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = tree
        for part in parents:
            node = node[part]
        del node[last]

    return edit


# (name, edit, expected path in the message, expected words in the message)
CORPUS: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("typo top-level", set_path("trainig_args", {}), "trainig_args", "unknown key"),
    ("typo training arg", set_path("training_args.lerning_rate", 1e-4), "training_args.lerning_rate", "learning_rate"),
    ("lr not a number", set_path("training_args.learning_rate", "fast"), "training_args.learning_rate", "number"),
    ("bad scheduler", set_path("training_args.lr_scheduler_type", "cosin"), "training_args.lr_scheduler_type", "cosine"),
    ("bad save strategy", set_path("training_args.save_strategy", "sometimes"), "training_args.save_strategy", "steps"),
    ("batch size in training_args", set_path("training_args.per_device_train_batch_size", 4), "training_args.per_device_train_batch_size", "batchsize_conf"),
    ("accumulation in training_args", set_path("training_args.gradient_accumulation_steps", 2), "training_args.gradient_accumulation_steps", "batchsize_conf"),
    ("output dir in training_args", set_path("training_args.output_dir", "/x"), "training_args.output_dir", "experiment.output_dir"),
    ("max_length in sft training_args", set_path("training_args.max_length", 128), "training_args.max_length", "sft_args.max_seq_length"),
    ("bad method", set_path("method", "ppo"), "method", "sft"),
    ("bad chat template", set_path("data_conf.chat_template_name", "chatml"), "data_conf.chat_template_name", "chat-ml"),
    ("bad pad strategy", set_path("data_conf.missing_pad_token_strategy", "pad-repurpose"), "data_conf.missing_pad_token_strategy", "eos-repurpose"),
    ("bad data input type", set_path("data_conf.training_data.type", "CONCAT"), "data_conf.training_data.type", "CONCATENATION"),
    ("auto split for training", set_path("data_conf.training_data", {"type": "AUTO_SPLIT"}), "data_conf.training_data.type", "CONCATENATION"),
    ("missing datasets", drop("data_conf.training_data.datasets"), "data_conf.training_data.datasets", "missing"),
    ("dataset path not a string", set_path("data_conf.training_data.datasets", [{"path": 3}]), "data_conf.training_data.datasets[0].path", "string"),
    ("unknown dataset key", set_path("data_conf.training_data.datasets", [{"path": "a", "weight": 2}]), "data_conf.training_data.datasets[0].weight", "unknown key"),
    ("split ratio too big", set_path("data_conf.validation_data.ratio", 1.5), "data_conf.validation_data.ratio", "less than 1"),
    ("missing validation data", drop("data_conf.validation_data"), "data_conf.validation_data", "missing"),
    ("missing batchsize_conf", drop("batchsize_conf"), "batchsize_conf", "missing"),
    ("zero batch size", set_path("batchsize_conf.total_train_batch_size", 0), "batchsize_conf.total_train_batch_size", "greater than 0"),
    ("bad peft type", set_path("peft_conf.peft_type", "LORRA"), "peft_conf.peft_type", "LORA"),
    ("lora r not int", set_path("peft_conf.peft_kwargs.r", "eight"), "peft_conf.peft_kwargs.r", "integer"),
    ("unknown lora kwarg", set_path("peft_conf.peft_kwargs.rank", 8), "peft_conf.peft_kwargs.rank", "unknown key"),
    ("bad task type", set_path("peft_conf.task_type", "CAUSAL"), "peft_conf.task_type", "CAUSAL_LM"),
    ("pretrained without path", set_path("peft_conf", {"peft_type": "PRETRAINED_PEFT"}), "peft_conf.name_or_path", "missing"),
    ("bad quantization type", set_path("quant_conf", {"quantization_type": "gptq"}), "quant_conf.quantization_type", "bits-and-bytes"),
    ("bad 4bit quant type", set_path("quant_conf", {"quantization_type": "bits-and-bytes", "bnb_4bit_quant_type": "int4"}), "quant_conf.bnb_4bit_quant_type", "nf4"),
    ("bad dtype", set_path("run_conf.model_args", {"dtype": "float8"}), "run_conf.model_args.dtype", "bfloat16"),
    ("unknown run_conf key", set_path("run_conf.modle", "x"), "run_conf.modle", "model"),
    ("lr_batch_size_scaling", set_path("overrides", {"lr_batch_size_scaling": "cubic"}), "overrides.lr_batch_size_scaling", "sqrt"),
    ("tracking without uri", set_path("tracking", {"experiment_name": "x"}), "tracking.mlflow_server_uri", "missing"),
    ("sft_args typo", set_path("sft_args", {"max_seq_len": 10}), "sft_args.max_seq_len", "max_seq_length"),
    ("bad sweep strategy", set_path("sweep", {"strategy": "bayes"}), "sweep.strategy", "grid"),
    ("random sweep without num_runs", set_path("sweep", {"strategy": "random"}), "sweep.num_runs", "missing"),
    ("bad experiment name", set_path("experiment.name", "no spaces please"), "experiment.name", "pattern"),
    ("zero chunks", set_path("experiment.num_chunks", 0), "experiment.num_chunks", "greater than or equal to 1"),
    ("a GPU listed twice", set_path("experiment.devices", [0, 0]), "experiment.devices", "runs_per_device"),
    ("zero runs per device", set_path("experiment.runs_per_device", 0), "experiment.runs_per_device", "greater than or equal to 1"),
    ("bad runs per device", set_path("experiment.runs_per_device", "many"), "experiment.runs_per_device", "auto"),
    ("knob candidate wrong type", set_path("peft_conf.peft_kwargs.r", {"$list": [8, "x"]}), "peft_conf.peft_kwargs.r[1]", "integer"),
    ("knob candidate bad enum", set_path("data_conf.chat_template_name", {"$list": ["chat-ml", "chatml"]}), "data_conf.chat_template_name[1]", "chat-ml"),
    ("range bound wrong", set_path("training_args.weight_decay", {"$range": {"start": 0.5, "end": 0.1}}), "training_args.weight_decay", "smaller than end"),
    ("grpo without reward functions", lambda t: t.update(method="grpo"), "grpo_args", "missing"),
    ("dpo with sft max_length owner", lambda t: t.update(method="dpo", training_args={"max_length": 10}), "training_args.max_length", "dpo_args.max_seq_length"),
]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name,edit,path,words", CORPUS, ids=[case[0] for case in CORPUS])
def test_broken_config_fails_with_path(name: str, edit, path: str, words: str) -> None:
    tree = broken(edit)
    issues = issues_of(tree)
    assert issues, f"{name}: expected an error"
    matching = [issue for issue in issues if issue.path == path]
    assert matching, f"{name}: no issue at {path}: {[str(i) for i in issues]}"
    text = " ".join(f"{i.message} {i.allowed or ''} {i.given or ''}" for i in matching)
    assert words.lower() in text.lower(), f"{name}: {text!r} lacks {words!r}"
    assert all(issue.location.startswith("test.yaml:") for issue in matching)


SCHEMA_EXEMPT = {
    # The schema cannot compare bounds or check a reward function name: pydantic does.
    "range bound wrong",
}


@pytest.mark.parametrize("name,edit,path,words", CORPUS, ids=[case[0] for case in CORPUS])
def test_broken_config_fails_json_schema(name: str, edit, path: str, words: str) -> None:
    if name in SCHEMA_EXEMPT:
        pytest.skip("checked by pydantic only")
    assert schema_errors(broken(edit)), f"{name}: the JSON Schema accepted it"


def test_every_error_is_reported_at_once(base_config) -> None:
    base_config["training_args"]["lerning_rate"] = 1
    base_config["peft_conf"]["peft_kwargs"]["r"] = "x"
    base_config["data_conf"]["chat_template_name"] = "nope"
    paths = {issue.path for issue in issues_of(base_config)}
    assert {"training_args.lerning_rate", "peft_conf.peft_kwargs.r", "data_conf.chat_template_name"} <= paths


def test_grid_sweep_rejects_a_range(base_config) -> None:
    base_config["training_args"]["learning_rate"] = {"$range": {"start": 1e-5, "end": 1e-3}}
    issues = issues_of(base_config)
    assert [issue.path for issue in issues] == ["training_args.learning_rate"]
    assert "grid search" in issues[0].message


@pytest.mark.parametrize(
    "knob,words",
    [
        ({"$range": {"start": 1e-3, "end": 1e-5}}, "smaller than end"),
        ({"$range": {"start": 0.0, "end": 1e-3, "log": True}}, "positive start"),
        ({"$range": {"start": "a", "end": 1}}, "bad $range"),
        ({"$list": []}, "non-empty"),
        ({"$range": [1, 2]}, "mapping"),
    ],
)
def test_bad_knobs(base_config, knob, words) -> None:
    base_config["sweep"] = {"strategy": "random", "num_runs": 2}
    base_config["training_args"]["learning_rate"] = knob
    issues = issues_of(base_config)
    assert issues and words in issues[0].message and issues[0].path == "training_args.learning_rate"


def test_range_on_a_string_field_fails(base_config) -> None:
    base_config["sweep"] = {"strategy": "random", "num_runs": 2}
    base_config["data_conf"]["chat_template_name"] = {"$range": {"start": 1, "end": 3}}
    paths = [issue.path for issue in issues_of(base_config)]
    assert "data_conf.chat_template_name.start" in paths


def test_knobs_are_not_allowed_in_experiment(base_config) -> None:
    base_config["experiment"]["num_chunks"] = {"$list": [2, 4]}
    issues = issues_of(base_config)
    assert issues[0].path == "experiment.num_chunks" and "cannot hold a sweep knob" in issues[0].message


@pytest.mark.parametrize("key,value", [("name", "other"), ("devices", "cpu"), ("runs_per_device", 2), ("backend", "ray"),
                                       ("gpu_state_budget_gb", 1.0), ("threads_per_worker", 2)])
def test_a_group_may_not_set_what_the_whole_experiment_shares(base_config, key, value) -> None:
    base_config["groups"] = [{"training_args": {"seed": 1}}, {"experiment": {key: value}}]
    issues = issues_of(base_config)
    assert [issue.path for issue in issues] == [f"groups[1].experiment.{key}"]
    assert "belongs to the whole experiment" in issues[0].message and "outside groups" in issues[0].allowed
    assert issues[0].location.startswith("test.yaml:1:")


def test_a_group_may_set_its_runs_own_experiment_keys(base_config) -> None:
    base_config["groups"] = [{"experiment": {"devices_per_run": 1, "num_chunks": 2, "max_eval_samples": 8}}, {}]
    assert issues_of(base_config) == []


def test_the_plan_keeps_the_experiment_settings_validated(base_config) -> None:
    from finetune.plan.build import build_plan
    from finetune.plan.model import RunPlan
    from tests.helpers import doc_of

    base_config["experiment"].update(runs_per_device=3, threads_per_worker=2)
    plan = build_plan(doc_of(base_config), train_examples=lambda config: 64)
    assert (plan.settings.runs_per_device, plan.settings.threads_per_worker) == (3, 2)
    older = plan.model_dump(mode="json")
    del older["settings"]  # a plan.json written before the plan held them
    assert RunPlan.model_validate(older).settings.runs_per_device == 3
