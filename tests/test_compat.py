"""Configs written for SiloGen's engine and older transformers: translated, noted, or rejected by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config.compat import TRAINING_ARGS, Dropped, Removed, Renamed
from finetune.config.loading import load_document
from finetune.config.validation import validate_document
from finetune.plan.build import build_plan
from tests.conftest import BASE_SFT, REPO

SILOGEN_CONFIGS = REPO.parent / "shared" / "reference" / "silogen-configs"
SHARED = sorted(SILOGEN_CONFIGS.glob("*.yaml")) if SILOGEN_CONFIGS.is_dir() else []


def written(tmp_path: Path, training_args: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE_SFT, "training_args": {**BASE_SFT["training_args"], **training_args}}))
    return path


@pytest.mark.skipif(not SHARED, reason="../shared/reference/silogen-configs is not beside this checkout")
@pytest.mark.parametrize("config", SHARED, ids=[path.stem for path in SHARED])
def test_configs_rendered_by_silogens_chart_validate_and_plan_as_written(config: Path) -> None:
    doc = load_document(config)
    assert validate_document(doc) == []
    plan = build_plan(load_document(config))
    assert plan.runs
    if "warmup_ratio" in config.read_text():
        assert any("warmup_ratio is read as training_args.warmup_steps" in notice for notice in doc.notices)
        assert "warmup_ratio" not in plan.runs[0].config["training_args"]


def test_warmup_ratio_becomes_a_fractional_warmup_steps_with_a_notice_at_its_line(tmp_path) -> None:
    doc = load_document(written(tmp_path, {"warmup_ratio": 0.05}))
    assert doc.tree["training_args"]["warmup_steps"] == 0.05 and "warmup_ratio" not in doc.tree["training_args"]
    assert validate_document(doc) == []
    (notice,) = doc.notices
    assert notice.startswith(f"{tmp_path / 'config.json'}:") and "warmup_steps: 0.05" in notice


@pytest.mark.parametrize("key", sorted(k for k, v in TRAINING_ARGS.items() if isinstance(v, Renamed)))
def test_every_renamed_key_is_read_under_its_new_name(tmp_path, key) -> None:
    value = {"evaluation_strategy": "steps", "torchdynamo": "inductor", "push_to_hub_token": "t", "push_to_hub_model_id": "m"}.get(key, True)
    doc = load_document(written(tmp_path, {key: value}))
    assert key not in doc.tree["training_args"] and TRAINING_ARGS[key].new in doc.tree["training_args"]
    assert validate_document(doc) == [], key
    assert len(doc.notices) == 1


@pytest.mark.parametrize("key", sorted(k for k, v in TRAINING_ARGS.items() if isinstance(v, Dropped)))
def test_every_key_without_effect_is_dropped_with_a_notice(tmp_path, key) -> None:
    doc = load_document(written(tmp_path, {key: "auto"}))
    assert key not in doc.tree["training_args"] and validate_document(doc) == []
    assert "is ignored" in doc.notices[0]


@pytest.mark.parametrize("key", sorted(k for k, v in TRAINING_ARGS.items() if isinstance(v, Removed)))
def test_every_removed_key_is_rejected_naming_what_replaced_it(tmp_path, key) -> None:
    (issue,) = validate_document(load_document(written(tmp_path, {key: 1})))
    assert issue.path == f"training_args.{key}" and "no longer exists" in issue.message
    assert TRAINING_ARGS[key].instead in issue.message


def test_old_and_new_name_together_is_an_error_not_a_silent_choice(tmp_path) -> None:
    issues = validate_document(load_document(written(tmp_path, {"warmup_ratio": 0.1, "warmup_steps": 5})))
    assert [issue.path for issue in issues] == ["training_args.warmup_ratio"]
    assert "old name of 'warmup_steps'" in issues[0].message


def test_legacy_keys_in_group_overlays_and_knobs_are_translated(tmp_path) -> None:
    tree = {**BASE_SFT, "groups": [{"training_args": {"warmup_ratio": {"$list": [0.01, 0.05]}}}, {}]}
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(tree))
    doc = load_document(path)
    assert doc.tree["groups"][0]["training_args"] == {"warmup_steps": {"$list": [0.01, 0.05]}}
    assert validate_document(doc) == []
    assert sorted(run.config["training_args"]["warmup_steps"] for run in build_plan(load_document(path)).runs if "warmup_steps" in run.config["training_args"]) == [0.01, 0.05]


def test_validate_prints_the_notice_and_json_carries_it(tmp_path) -> None:
    config = written(tmp_path, {"evaluation_strategy": "steps"})
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(config)], capture_output=True, text=True)
    assert result.returncode == 0 and "note:" in result.stderr and "eval_strategy" in result.stderr
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(config), "--json"], capture_output=True, text=True)
    assert result.returncode == 0 and "eval_strategy" in json.loads(result.stdout)["notices"][0]
