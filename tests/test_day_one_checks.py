"""Issue 31, item 1: what can be checked is checked before any work, and a failed start blocks no rerun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from tests.conftest import EXAMPLES

runner = CliRunner()


@pytest.fixture
def project(demo_project, monkeypatch) -> Path:
    """A folder with the demo at demo/ (a link) and the grid example, as after `finetune demo init demo`."""
    (demo_project / "grid.yaml").write_text((EXAMPLES / "sft-lora-grid.yaml").read_text())
    monkeypatch.chdir(demo_project)
    return demo_project


def variant(project: Path, name: str, old: str, new: str) -> str:
    text = (project / "grid.yaml").read_text()
    assert old in text
    (project / name).write_text(text.replace(old, new))
    return name


def test_a_missing_data_file_is_a_warning_for_validate_and_an_error_for_plan_and_run(project) -> None:
    config = variant(project, "trian.yaml", "demo/data/sft_train.jsonl", "data/trian.jsonl")
    checked = runner.invoke(app, ["validate", config])
    assert checked.exit_code == 0 and "warning" in checked.output and "data/trian.jsonl does not exist" in checked.output
    for command in ("plan", "run"):
        refused = runner.invoke(app, [command, config])
        assert refused.exit_code == 1, refused.output
        assert "data_conf.training_data.datasets[0].path: data/trian.jsonl does not exist (every run)" in refused.output
        assert "found before any work" in refused.output
    assert not (project / "runs").exists()  # run made no folder


def test_a_missing_model_that_reads_as_a_local_path_is_named_with_a_suggestion(project) -> None:
    config = variant(project, "modle.yaml", "model: demo/model", "model: demo/modle")
    checked = runner.invoke(app, ["validate", config, "--json"])
    assert checked.exit_code == 0 and "did you mean demo/model?" in checked.stdout
    refused = runner.invoke(app, ["plan", config])
    assert refused.exit_code == 1
    assert "run_conf.model: demo/modle does not exist (did you mean demo/model?); demo/ is a folder here" in refused.output
    assert runner.invoke(app, ["validate", "grid.yaml"]).output.count("warning") == 0


def test_a_hub_id_outside_the_cache_is_refused_in_offline_mode_only(project, monkeypatch) -> None:
    config = variant(project, "hub.yaml", "model: demo/model", "model: someorg/not-cached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused = runner.invoke(app, ["plan", config])
    assert refused.exit_code == 1 and "HF_HUB_OFFLINE is set" in refused.output
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert runner.invoke(app, ["plan", config]).exit_code == 0  # online, a hub id is `run`'s to resolve


def test_plan_parses_the_first_records(project) -> None:
    (project / "broken.jsonl").write_text('{"messages": []}\n{"messages": [}\n')
    config = variant(project, "broken.yaml", "demo/data/sft_train.jsonl", "broken.jsonl")
    refused = runner.invoke(app, ["plan", config])
    assert refused.exit_code == 1 and "broken.jsonl:2: not a JSON record" in refused.output


@pytest.mark.slow
def test_run_reads_the_records_and_applies_the_template_before_making_the_folder(project) -> None:
    (project / "shape.jsonl").write_text('{"text": "a record of another shape"}\n')
    config = variant(project, "shape.yaml", "demo/data/sft_train.jsonl", "shape.jsonl")
    assert runner.invoke(app, ["plan", config]).exit_code == 0  # plan reads syntax only
    refused = runner.invoke(app, ["run", config])
    assert refused.exit_code == 1 and "shape.jsonl:1:" in refused.output and "may name its format" in refused.output
    assert "nothing was started" in refused.output and not (project / "runs").exists()


def test_an_experiment_that_never_trained_a_chunk_is_started_afresh(tmp_path) -> None:
    from finetune.schedule.experiment import clear_folder, never_trained
    from finetune.schedule.folder import LOCK_FILE
    from finetune.schedule.store import StateStore

    root = tmp_path / "exp"
    root.mkdir()
    assert not never_trained(root)  # nothing there
    (root / "plan.json").write_text("{}")
    assert never_trained(root)
    store = StateStore(root / "state.db", create=True)
    store.add_run("a", "base", 2)
    assert never_trained(root)
    store.record_chunk("a", 0, 4, str(root / "runs/a/chunk-0"), {}, 1.0, 1.0, 0.0, 0.0, 1.0)
    assert not never_trained(root)
    store.close()
    (root / LOCK_FILE).write_text("")
    (root / "runs").mkdir()
    clear_folder(root)
    assert sorted(os.listdir(root)) == [LOCK_FILE]


def test_a_length_limit_that_leaves_no_run_any_example_stops_before_training_and_leaves_no_folder(tmp_path, demo_dir) -> None:
    """Every run's data filtered away (examples longer than the limit): one error, each problem once with
    the runs it stopped, exit 1, no experiment folder. A limit that leaves only some runs without data fails
    those runs alone, and the others train (a grid is not all-or-nothing)."""
    from tests.test_training import demo_config, finetune, small, states

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "short")
    refused = finetune(tmp_path, "run", str(config), *small("short"), "--set", "sft_args.max_seq_length=4", check=False)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert "no run's model and data could be prepared, so nothing was trained" in refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if "no training example is left" in line]
    assert "longer than 4 tokens (sft_args.max_seq_length)" in line and line.count(", ") >= 3  # the four runs
    assert not (tmp_path / "runs" / "short").exists()

    mixed = finetune(tmp_path, "run", str(config), *small("mixed", steps=2, chunks=1), "--set",
                     "sft_args.max_seq_length=!list [4, 256]", "--set", "peft_conf.peft_kwargs.r=!list [4]",
                     "--set", "training_args.learning_rate=!list [1e-3]", check=False)
    assert mixed.returncode == 1, mixed.stdout[-2000:] + mixed.stderr[-2000:]
    assert sorted(states(tmp_path / "runs" / "mixed").values()) == ["completed", "failed"]


@pytest.mark.parametrize("strategy", ["grid", "optuna"])
def test_no_run_prepared_stops_a_fixed_plan_but_not_a_search_that_proposes_more(tmp_path, monkeypatch, strategy) -> None:
    """Optuna proposes runs as it goes, and a later proposal may be one that can be prepared: only a plan whose
    runs are all known stops when none of them could be."""
    import finetune.schedule.preparation as preparation
    from finetune.plan.model import RunPlan
    from tests.test_controller import planned

    plan = RunPlan(experiment="t", output_dir=str(tmp_path), source="t.yaml", num_chunks=2, sweeps=[{"strategy": strategy}],
                   runs=[planned("a"), planned("b")])
    monkeypatch.setattr(preparation, "finalize_plan", lambda plan, root: plan.model_copy(
        update={"failed": {"a": "ValueError: too short", "b": "ValueError: too short"}}))
    if strategy == "grid":
        with pytest.raises(preparation.ExperimentError, match=r"nothing was trained:\n  ValueError: too short \(runs a, b\)$"):
            preparation.load_or_create_plan(plan, tmp_path, resume=False)
        assert not (tmp_path / "plan.json").exists()
    else:
        assert preparation.load_or_create_plan(plan, tmp_path, resume=False).failed.keys() == {"a", "b"}
        assert (tmp_path / "plan.json").is_file()


def test_a_search_whose_every_proposal_is_rejected_ends_with_an_error_not_an_empty_report(tmp_path, demo_dir) -> None:
    """Optuna's runs are prepared as it proposes them: when none can be (every example filtered away), `finetune
    run` exits 1 saying why, each reason once with the proposals it refused, instead of exit 0 and no runs."""
    import re

    from tests.test_training import demo_config, finetune, small

    config = demo_config(tmp_path, demo_dir, "sft-optuna.yaml", "search")
    refused = finetune(tmp_path, "run", str(config), *small("search", steps=4, chunks=2), "--set", "sft_args.max_seq_length=4",
                       check=False)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and "none could start, so nothing was trained" in refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if "no training example is left" in line]
    assert re.search(r"\(sft_args\.max_seq_length\).*\(\d+ proposals?\)$", line), line
    assert "Ranked by" not in refused.stdout  # no empty report
