"""GGUF files as base models: converted once into a safetensors folder beside the experiments, refused
before any work when they cannot load, and trained and evaluated through `finetune run`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from finetune.config.validation import CONFIG_ADAPTER
from tests.conftest import BASE_SFT
from tests.gguf_files import write_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, demo_dir) -> Path:
    return write_tiny_gguf(demo_dir / "model", tmp_path_factory.mktemp("gguf") / "tiny-demo.gguf")


def config_for(model: str, output_dir: Path, **model_args):
    tree = copy.deepcopy(BASE_SFT)
    tree["run_conf"] = {"model": model, "model_args": {"dtype": "float32", **model_args}}
    tree["experiment"]["output_dir"] = str(output_dir)
    return CONFIG_ADAPTER.validate_python(tree)


def test_a_gguf_file_is_converted_once_into_the_models_own_weights(tiny_gguf, demo_dir, tmp_path, capfd) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.train.gguf_bases import model_path
    from finetune.train.model import load_base_model, load_tokenizer

    config = config_for(str(tiny_gguf), tmp_path / "runs")
    converted = Path(model_path(config))
    assert converted.parent == (tmp_path / "runs" / "gguf-bases").resolve() and converted.name.startswith("tiny-demo-")
    assert "to a safetensors model" in capfd.readouterr().err  # the progress line
    original = AutoModelForCausalLM.from_pretrained(demo_dir / "model", dtype=torch.float32).state_dict()
    loaded = load_base_model(config, 0).state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[name], loaded[name]) for name in original)
    text = "What is 3 plus 4?"
    assert load_tokenizer(config)(text).input_ids == AutoTokenizer.from_pretrained(demo_dir / "model")(text).input_ids
    # The folder form names the same file: the same cache entry, not converted again.
    again = config_for(str(tiny_gguf.parent), tmp_path / "runs", gguf_file=tiny_gguf.name)
    assert Path(model_path(again)) == converted and "to a safetensors model" not in capfd.readouterr().err
    assert not [path for path in converted.parent.iterdir() if path.name.startswith(".")]  # no temporary folder left


def test_a_missing_gguf_file_is_refused_naming_the_key(tmp_path) -> None:
    from finetune.train.preflight import preflight

    problems = dict(preflight(config_for(str(tmp_path / "absent.gguf"), tmp_path), ["cpu"], lambda config: None))
    assert "absent.gguf" in problems["run_conf.model"]
    folder_form = config_for(str(tmp_path), tmp_path, gguf_file="absent.gguf")
    problems = dict(preflight(folder_form, ["cpu"], lambda config: None))
    assert problems["run_conf.model_args.gguf_file"] == f"{tmp_path / 'absent.gguf'} does not exist (a GGUF file was expected there)"


def test_without_the_gguf_package_the_error_says_what_to_install(tiny_gguf, tmp_path, monkeypatch) -> None:
    import importlib.util

    from finetune.train import gguf_bases

    real = importlib.util.find_spec
    monkeypatch.setattr(gguf_bases.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    problems = gguf_bases.gguf_problems(config_for(str(tiny_gguf), tmp_path))
    assert problems == [("run_conf.model", f"{tiny_gguf} is a GGUF file; reading it needs the gguf package: "
                         "pip install 'finetune[gguf]'")]
    with pytest.raises(ValueError, match=r"run_conf.model: .*pip install 'finetune\[gguf\]'"):
        gguf_bases.model_path(config_for(str(tiny_gguf), tmp_path))


def test_an_architecture_transformers_cannot_load_is_refused(tmp_path) -> None:
    import gguf

    from finetune.train.gguf_bases import gguf_problems

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "not-a-model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    [(key, problem)] = gguf_problems(config_for(str(path), tmp_path))
    assert key == "run_conf.model" and "'not-a-model' model, which transformers cannot load from GGUF" in problem
    assert "llama" in problem  # what it can load
    (tmp_path / "text.gguf").write_text("not a gguf file")
    [(key, problem)] = gguf_problems(config_for(str(tmp_path / "text.gguf"), tmp_path))
    assert "cannot be read as a GGUF file" in problem


@pytest.mark.slow
def test_a_gguf_base_trains_and_evaluates_through_finetune_run(tiny_gguf, demo_dir, tmp_path) -> None:
    """The real path: preflight, conversion once, workers that load the copy, an evaluation before training
    (eval_on_start), two LoRA steps, an evaluation; base scores and kept answers in state.db, report and dashboard."""
    import json

    from tests.helpers import state_db
    from tests.test_training import demo_config, finetune, small

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "gguf")
    result = finetune(tmp_path, "run", str(config), *small("gguf", steps=2, chunks=1), "--set", f"run_conf.model={tiny_gguf}",
                      "--set", "training_args.learning_rate=!list [1.0e-3]", "--set", "peft_conf.peft_kwargs.r=!list [4]",
                      "--set", "eval_conf={metrics: [eval_loss, exact_match], generation: {max_new_tokens: 4, max_samples: 4}}",
                      "--set", "training_args.eval_on_start=true")
    assert result.stderr.count("to a safetensors model") == 1, result.stderr[-2000:]
    root = tmp_path / "runs" / "gguf"
    with state_db(root) as db:
        [(metrics,)] = db.execute("SELECT metrics FROM chunks").fetchall()
        at_start = dict(db.execute("SELECT name, value FROM metrics WHERE step = 0").fetchall())
        kept = db.execute("SELECT step, COUNT(*) FROM samples GROUP BY step ORDER BY step").fetchall()
    assert {"eval_loss", "exact_match"} <= json.loads(metrics).keys()
    assert {"eval_loss", "exact_match"} <= at_start.keys() and at_start["eval_loss"] != json.loads(metrics)["eval_loss"]
    assert kept == [(0, 4), (2, 4)]
    import sqlite3

    tracked = sqlite3.connect(root / "mlflow.db")  # MLflow's own store: the base's values at step 0 too
    assert {"eval_loss", "exact_match"} <= {key for (key,) in tracked.execute("SELECT key FROM metrics WHERE step = 0")}
    tracked.close()
    report = finetune(tmp_path, "report", str(root)).stdout + (root / "report.md").read_text()
    assert "| - | base | the model before training (step 0) |" in report and "## Answers" in report
    from finetune.dashboard.views import runs_view, samples_view

    [shown] = runs_view(root)["runs"]
    assert shown["base"]["eval_loss"] == at_start["eval_loss"]
    assert [sample["step"] for sample in samples_view(root, shown["run_id"])["samples"]] == [0] * 4 + [2] * 4
    [converted] = (tmp_path / "runs" / "gguf-bases").iterdir()
    [final] = root.glob("runs/*/checkpoint-final")
    adapter = json.loads((final / "adapter_config.json").read_text())
    # The chat template added tokens: the grown base is the converted model's, written once per experiment.
    base = Path(adapter["base_model_name_or_path"])
    assert base.is_dir() and json.loads((base / "config.json").read_text())["vocab_size"] > 0
    assert (converted / "model.safetensors").is_file()
    # `finetune chat`: the run's adapter on the converted base answers, as the evaluation did.
    [run_id] = [row["run_id"] for row in runs_view(root)["runs"]]
    chat = finetune(tmp_path, "chat", str(root), "best", "--prompt", "What is 3 plus 4?", "--max-new-tokens", "4")
    assert f"run {run_id}" in chat.stdout and "checkpoint-final" in chat.stdout
    refused = finetune(tmp_path, "chat", str(root), "nosuchrun", "--prompt", "hi", check=False)
    assert refused.returncode == 1 and "has no run 'nosuchrun'; its runs: " in refused.stderr  # as export and ctl say it
    assert finetune(tmp_path, "chat", str(root), run_id[:4], "--prompt", "hi", "--max-new-tokens", "2").returncode == 0
