"""Checks before any work, alone: each names the config key and what to do."""

from __future__ import annotations

import copy

import pytest

from finetune.config.validation import CONFIG_ADAPTER
from finetune.train.preflight import check_attention, check_model_source, check_precision
from tests.conftest import BASE_SFT


def config_with(**sections):
    tree = copy.deepcopy(BASE_SFT)
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return CONFIG_ADAPTER.validate_python(tree)


@pytest.mark.parametrize("model,problem", [
    ("meta-llama/Llama-3.2-1B", False),  # a hub id: cannot be checked offline, so it is not refused
    ("gpt2", False),
    ("/no/such/dir", True),
    ("./missing-model", True),
    ("models/a/b", True),
    ("bad id with spaces", True),
])
def test_a_model_that_is_neither_a_directory_nor_a_hub_id_is_refused(model, problem) -> None:
    found = check_model_source(config_with(run_conf={"model": model}))
    assert bool(found) == problem and all(path == "run_conf.model" for path, _ in found)


def test_the_chat_template_is_applied_to_each_data_file_s_first_record(tmp_path, monkeypatch) -> None:
    from finetune.train import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    config = config_with(run_conf={"model": str(tmp_path)})
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    read = lambda path, method, data_format: [{"messages": conversation}]  # noqa: E731
    monkeypatch.setattr("finetune.data.pipeline.prepare_tokenizer", lambda tokenizer, data_conf: 0)

    class Refusing:
        def apply_chat_template(self, *args, **kwargs):
            raise ValueError("Conversation roles must alternate")

    (problem,) = preflight.check_data_and_template(config, lambda c: Refusing(), read)
    assert problem[0] == "data_conf.chat_template_name"
    assert "does not apply to the first record of train.jsonl" in problem[1] and "roles must alternate" in problem[1]

    def unreadable(path, method, data_format):
        raise ValueError(f"{path}:1: missing key 'messages'")

    assert preflight.check_data_and_template(config, lambda c: Refusing(), unreadable) == [
        ("data_conf.training_data.datasets[0].path", "train.jsonl:1: missing key 'messages'")]


def test_an_existing_directory_is_fine(tmp_path) -> None:
    assert check_model_source(config_with(run_conf={"model": str(tmp_path)})) == []


def test_flash_attention_needs_its_package_and_a_gpu() -> None:
    (problem,) = check_attention(config_with(run_conf={"model": "m", "model_args": {"attn_implementation": "flash_attention_2"}}), ["cpu"])
    assert problem[0] == "run_conf.model_args.attn_implementation" and "flash_attn" in problem[1]
    assert check_attention(config_with(run_conf={"model": "m", "model_args": {"attn_implementation": "sdpa"}}), ["cpu"]) == []


def test_fp16_on_the_cpu_is_refused_bf16_is_not() -> None:
    (problem,) = check_precision(config_with(training_args={"fp16": True, "bf16": False}), ["cpu"])
    assert problem[0] == "training_args.fp16"
    assert check_precision(config_with(training_args={"bf16": True}), ["cpu"]) == []


def test_backend_ray_without_ray_names_the_extra(monkeypatch) -> None:
    import importlib.util

    from finetune.train import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    (problem,) = preflight.check_backend(config_with(experiment={"name": "t", "backend": "ray"}))
    assert problem == ("experiment.backend", "ray needs the ray package: pip install 'finetune[ray]'")
    assert preflight.check_backend(config_with()) == []


def test_on_a_ray_cluster_device_checks_are_left_to_the_workers(tmp_path, monkeypatch) -> None:
    """The driver (a pod without a GPU, say) cannot judge the cluster's GPUs."""
    from finetune.train.preflight import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "org" ).mkdir()
    (tmp_path / "org" / "model").mkdir()
    config = config_with(run_conf={"model": "org/model", "model_args": {"attn_implementation": "flash_attention_2"}},
                         training_args={"fp16": True, "bf16": False}, quant_conf={"quantization_type": "bits-and-bytes", "load_in_4bit": True})
    assert preflight(config, None, lambda c: None) == []
    assert {path for path, _ in preflight(config, ["cpu"], lambda c: None)} == {
        "quant_conf.quantization_type", "run_conf.model_args.attn_implementation", "training_args.fp16"}
