"""Every training_args key is honoured, passed to TRL, ignored with a note, or refused: none validates and
then silently does nothing (finetune.config.training_keys); docs/compatibility.md lists them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config.compat import compatibility_markdown
from finetune.config.loading import load_document
from finetune.config.snapshot_models import load_snapshot
from finetune.config.training_keys import Honoured, Ignored, Passed, Refused, fate_of
from finetune.config.validation import validate_document
from tests.conftest import BASE_SFT, REPO

# Keys a new user tried (issue 27): each has a decided fate, none is merely passed to TRL, where train() alone reads it.
TRIED = ["report_to", "push_to_hub", "hub_model_id", "eval_steps", "eval_strategy", "save_steps", "save_total_limit",
         "load_best_model_at_end", "eval_on_start", "sync_ref_model", "gradient_checkpointing", "neftune_noise_alpha",
         "logging_nan_inf_filter", "include_num_input_tokens_seen", "auto_find_batch_size", "data_seed"]


def written(tmp_path: Path, training_args: dict, **sections) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE_SFT, **sections, "training_args": {**BASE_SFT["training_args"], **training_args}}))
    return path


def dpo(**peft) -> dict:
    return {"method": "dpo", "sft_args": None, "peft_conf": peft or BASE_SFT["peft_conf"]}


@pytest.mark.parametrize("key", TRIED)
def test_the_keys_users_tried_have_a_decided_fate(key) -> None:
    for method in ("sft", "dpo", "grpo"):
        if key in load_snapshot("trl")["methods"][method]["fields"]:
            assert isinstance(fate_of(key, method), (Honoured, Ignored, Refused)), (key, method)


def test_the_compatibility_page_lists_every_key_of_every_method_with_its_fate() -> None:
    page = compatibility_markdown()
    assert page == (REPO / "docs" / "compatibility.md").read_text()  # also `finetune schema-docs --check`
    table = page.split("## What finetune does with each training argument", 1)[1]
    for method, spec in load_snapshot("trl")["methods"].items():
        for key in spec["fields"]:
            rows = [line for line in table.splitlines() if line.startswith(f"| `{key}` |")]
            assert any(method in row.split("|")[2] for row in rows), (key, method)
    assert "| `push_to_hub` | sft, dpo, grpo | refused at validate" in table
    assert "| `eval_steps` | sft, dpo, grpo | ignored, with a note | experiment.eval_every_chunks" in table


def test_ignored_keys_are_dropped_with_a_note_naming_what_to_use(tmp_path) -> None:
    doc = load_document(written(tmp_path, {"eval_strategy": "steps", "eval_steps": 10, "save_total_limit": 2,
                                           "hub_model_id": "me/model", "dataset_text_field": "text"}))
    assert not {"eval_strategy", "eval_steps", "save_total_limit", "hub_model_id", "dataset_text_field"} & set(doc.tree["training_args"])
    assert validate_document(doc) == []
    notes = "\n".join(doc.notices)
    assert "training_args.eval_steps is ignored" in notes and "experiment.eval_every_chunks" in notes
    assert "training_args.dataset_text_field is ignored" in notes and "data_conf" in notes
    assert all(notice.startswith(f"{tmp_path / 'config.json'}:") for notice in doc.notices)  # with the file position


def test_a_key_ignored_by_one_method_only_stays_for_the_others(tmp_path) -> None:
    doc = load_document(written(tmp_path, {"pad_to_multiple_of": 8}, **dpo()))
    assert doc.tree["training_args"]["pad_to_multiple_of"] == 8 and not doc.notices  # DPO's collator reads it
    assert validate_document(doc) == []


@pytest.mark.parametrize(("training_args", "key", "allowed"), [
    ({"push_to_hub": True}, "push_to_hub", "False"),
    ({"auto_find_batch_size": True}, "auto_find_batch_size", "False"),
    ({"report_to": ["tensorboard"]}, "report_to", "mlflow, wandb, none"),
    ({"report_to": "all"}, "report_to", "mlflow, wandb, none"),
])
def test_refused_values_name_the_key_and_what_to_use(tmp_path, training_args, key, allowed) -> None:
    (issue,) = validate_document(load_document(written(tmp_path, training_args)))
    assert issue.path == f"training_args.{key}" and allowed in issue.allowed
    assert issue.location.startswith(str(tmp_path / "config.json") + ":")


def test_values_that_ask_for_nothing_validate(tmp_path) -> None:
    for training_args in ({"push_to_hub": False}, {"report_to": ["wandb", "mlflow"]}, {"report_to": "none"}):
        assert validate_document(load_document(written(tmp_path, training_args))) == [], training_args


def test_sync_ref_model_needs_a_separate_reference_model(tmp_path) -> None:
    (issue,) = validate_document(load_document(written(tmp_path, {"sync_ref_model": True}, **dpo())))
    assert issue.path == "training_args.sync_ref_model" and "PEFT" in issue.message
    assert validate_document(load_document(written(tmp_path, {"sync_ref_model": True}, **dpo(peft_type="NO_PEFT")))) == []
    sharded = {"name": "t", "num_chunks": 4, "distributed": "fsdp", "devices_per_run": 2}
    issues = validate_document(load_document(written(tmp_path, {"sync_ref_model": True}, **dpo(peft_type="NO_PEFT"),
                                                     experiment=sharded)))
    assert [issue.path for issue in issues] == ["training_args.sync_ref_model"]


def test_a_refused_candidate_of_a_knob_is_named(tmp_path) -> None:
    issues = validate_document(load_document(written(tmp_path, {"push_to_hub": {"$list": [False, True]}})))
    assert [issue.path for issue in issues] == ["training_args.push_to_hub[1]"]


def test_ignored_keys_never_reach_trl_from_a_config_built_without_a_file(tmp_path) -> None:
    from finetune.config.models import CONFIG_ADAPTER
    from finetune.plan.derive import derive
    from finetune.train.trainer import trl_arguments

    tree = {**BASE_SFT, "training_args": {**BASE_SFT["training_args"], "eval_steps": 3, "hub_model_id": "me/model",
                                          "report_to": ["wandb"], "disable_tqdm": False}}
    config = CONFIG_ADAPTER.validate_python(tree)
    args = trl_arguments(config, derive(config, 64), tmp_path, "cpu")
    assert args.eval_steps is None and args.hub_model_id is None and args.report_to == [] and args.disable_tqdm
    assert isinstance(fate_of("beta", "dpo"), Passed)
