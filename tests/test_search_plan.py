"""Planning searches that propose runs while the experiment goes on (optuna, pbt): what `plan` shows, what
`validate` refuses, and that neither imports optuna or the ML stack."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import BASE_SFT, EXAMPLES, REPO
from finetune.plan.build import build_plan
from tests.helpers import doc_of, issues_of


def study_config(**sweep) -> dict:
    config = copy.deepcopy(BASE_SFT)
    config["training_args"]["learning_rate"] = {"$range": {"start": 1e-5, "end": 1e-3, "log": True}}
    config["peft_conf"]["peft_kwargs"]["r"] = {"$list": [4, 8]}
    config["sweep"] = {"strategy": "optuna", "num_runs": 6, **sweep}
    return config


def test_plan_of_a_study_holds_no_run_and_its_search_space() -> None:
    plan = build_plan(doc_of(study_config()), train_examples=lambda config: 100)
    assert plan.runs == [] and list(plan.search_spaces) == [0]
    assert plan.search_spaces[0]["training_args"]["learning_rate"] == {"$range": {"start": 1e-5, "end": 1e-3, "log": True}}
    assert plan.first_config()["training_args"]["learning_rate"] == 1e-5  # each knob's first value


def test_plan_of_pbt_holds_its_population_and_its_search_space() -> None:
    config = study_config()
    config["sweep"] = {"strategy": "pbt", "num_runs": 3, "seed": 1}
    plan = build_plan(doc_of(config), train_examples=lambda config: 100)
    assert len(plan.runs) == 3 and list(plan.search_spaces) == [0]


@pytest.mark.parametrize(("sweep", "path"), [
    ({"sampler": "bayes"}, "sweep.sampler"),
    ({"pruner": "percentile"}, "sweep.pruner"),
    ({"max_concurrent_runs": 0}, "sweep.max_concurrent_runs"),
    ({"num_runs": 0}, "sweep.num_runs"),
    ({"num_runs": 20, "max_runs": 10}, "sweep.num_runs"),
    ({"reduction_factor": 1}, "sweep.reduction_factor"),
    ({"population": 4}, "sweep.population"),
])
def test_bad_study_settings_name_their_key(sweep: dict, path: str) -> None:
    issues = issues_of(study_config(**sweep))
    assert [issue.path for issue in issues] == [path], issues


def test_plan_command_shows_the_search_space_without_importing_optuna(demo_project) -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from finetune.cli import app; "
        f"result = CliRunner().invoke(app, ['plan', {str(EXAMPLES / 'sft-optuna.yaml')!r}]); "
        "heavy = [m for m in ('optuna', 'torch', 'transformers', 'mlflow') if m in sys.modules]; "
        "print(result.exit_code, ','.join(heavy)); print(result.output)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=demo_project,
                            env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    first, _, shown = output.partition("\n")
    assert first.strip() == "0", output
    text = " ".join(shown.split())
    assert "proposes runs as the experiment goes" in text and "up to 8 in all" in text
    assert "training_args.learning_rate: float in [0.0001, 0.003], log scale" in text
    assert "peft_conf.peft_kwargs.r: one of 4, 8, 16" in text


def test_plan_json_of_a_study_is_a_plan_with_its_search_space(demo_project) -> None:
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "plan", str(EXAMPLES / "sft-optuna.yaml"), "--json"],
                            capture_output=True, text=True, cwd=demo_project, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0 and "No module named finetune.cli.__main__" in result.stderr:
        pytest.skip("finetune.cli has no __main__")
    plan = json.loads(result.stdout)
    assert plan["runs"] == [] and plan["sweeps"][0]["strategy"] == "optuna" and "0" in plan["search_spaces"]
