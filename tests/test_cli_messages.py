"""Issue 31, item 6: the command line's small holes, each with its test."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from finetune.cli import app
from finetune.cli_common import UnknownRun, resolve_run_id
from tests.conftest import BASE_SFT, EXAMPLES
from tests.helpers import issues_of
from tests.test_experiment_folder import make_experiment, run_ids

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and re.fullmatch(r"finetune \d+\.\d+\.\d+\S*\n", result.output)


def test_help_shows_flags_without_a_type() -> None:
    result = runner.invoke(app, ["export", "--help"], terminal_width=80)
    assert result.exit_code == 0 and re.search(r"--merged\s+Merge", result.output) and "<bool>" not in result.output


@pytest.mark.parametrize("key,given,suggested", [
    ("peft_conf.peft_type", "lora", "LORA"),
    ("data_conf.chat_template_name", "chatml", "chat-ml"),
    ("data_conf.chat_template_name", "Chat_ML", "chat-ml"),
    ("method", "SFT", "sft"),
])
def test_a_wrong_case_or_spelling_of_a_choice_gets_a_did_you_mean(base_config, key, given, suggested) -> None:
    section, _, name = key.rpartition(".")
    (base_config[section] if section else base_config)[name] = given
    (issue,) = issues_of(base_config)
    assert f"did you mean '{suggested}'?" in issue.message
    assert "NO_PEFT" not in (issue.allowed or "")  # 47 kinds are not listed at someone who wrote lora


def test_a_typo_on_a_swept_key_is_reported_once(base_config) -> None:
    base_config["training_args"]["learnin_rate"] = {"$list": [1e-4, 2e-4, 3e-4]}
    (issue,) = issues_of(base_config)
    assert issue.path == "training_args.learnin_rate" and "did you mean 'learning_rate'" in issue.message
    base_config["training_args"].pop("learnin_rate")
    base_config["training_args"]["learning_rate"] = {"$list": [1e-4, "fast", "slow"]}
    assert [issue.path for issue in issues_of(base_config)] == ["training_args.learning_rate[1]", "training_args.learning_rate[2]"]


def test_a_key_made_by_set_is_located_at_the_set(tmp_path) -> None:
    config = tmp_path / "units.yaml"
    config.write_text(json.dumps(BASE_SFT))
    result = runner.invoke(app, ["validate", str(config), "--set", "trainig_args.learning_rate=1e-4"])
    assert result.exit_code == 1
    assert "--set trainig_args.learning_rate: trainig_args: unknown key 'trainig_args'; did you mean 'training_args'?" in result.output
    assert "units.yaml:" not in result.output


def test_run_ids_are_accepted_by_unambiguous_prefix_and_listed_otherwise(tmp_path) -> None:
    runs = {"2923fe09b2": "r=4", "29a0000000": "r=8", "fddedc909b": "r=16"}
    assert resolve_run_id("fdd", runs, tmp_path) == "fddedc909b" and resolve_run_id("29a", runs, tmp_path) == "29a0000000"
    with pytest.raises(UnknownRun, match=r"'29' is the start of 2 runs of .*: 2923fe09b2 \(r=4\), 29a0000000 \(r=8\); give more"):
        resolve_run_id("29", runs, tmp_path)
    with pytest.raises(UnknownRun, match=r"has no run 'best'; its runs: 2923fe09b2 \(r=4\), 29a0000000 \(r=8\), fddedc909b"):
        resolve_run_id("best", runs, tmp_path)
    root = make_experiment(tmp_path)
    first = run_ids(root)[0]
    stopped = runner.invoke(app, ["ctl", "stop", str(root), first[:6]])
    assert stopped.exit_code == 0 and f"stop {first}" in stopped.output
    missing = runner.invoke(app, ["export", str(root), "nosuch"])
    assert missing.exit_code == 1 and all(run_id in missing.output for run_id in run_ids(root))


def test_status_on_a_folder_that_holds_experiments_names_them(tmp_path) -> None:
    root = make_experiment(tmp_path)  # tmp_path/exp
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 2 and f"holds experiments: {root}" in result.output and "backup" not in result.output


def test_tables_fit_80_columns_without_cutting_ids_or_breaking_numbers(tmp_path) -> None:
    from finetune.config import load_document
    from finetune.plan.build import build_plan
    from finetune.plan.render import compact_steps, plan_table
    from finetune.schedule.display import runs_table
    from finetune.schedule.store import StateStore

    assert compact_steps([16, 16, 16, 17]) == "3x16+17" and compact_steps([5]) == "5"
    plan = build_plan(load_document(EXAMPLES / "sft-lora-grid.yaml"), train_examples=lambda config: 1000)
    store = StateStore(tmp_path / "state.db")
    for run in plan.runs:
        store.add_run(run.run_id, run.label + ",lora_dropout=0.05,warmup_ratio=0.1", 4)
        store.record_chunk(run.run_id, 0, 125, str(tmp_path), {"eval_loss": 1.2345678}, 1.0, 1.0)
    for table in (plan_table(plan), runs_table(store, "exp", ("rouge_l",))):
        console = Console(file=io.StringIO(), width=80)
        console.print(table)
        shown = console.file.getvalue()
        assert max(map(len, shown.splitlines())) <= 80
        for run in plan.runs:
            assert run.run_id in shown
        assert "…" not in shown
    assert "1.2346" in shown and "0.001" in plan_console_text(plan_table(plan))


def plan_console_text(table) -> str:
    console = Console(file=io.StringIO(), width=80)
    console.print(table)
    return console.file.getvalue()


def test_a_pbt_clone_s_label_has_short_numbers(tmp_path) -> None:
    from finetune.schedule.control import CloneParent, CloneRequest, plan_clone
    from finetune.schedule.folder import read_plan
    from finetune.schedule.records import RunStatus

    root = make_experiment(tmp_path)
    parent = read_plan(root).runs[0]
    clone = plan_clone(CloneParent(parent, RunStatus.PENDING, 1, None),
                       CloneRequest(("training_args.learning_rate=0.0012000000000000001",), False), set())
    assert clone.label == f"clone of {parent.run_id}: training_args.learning_rate=0.0012"
    assert clone.config["training_args"]["learning_rate"] == 0.0012000000000000001  # the value itself is exact
