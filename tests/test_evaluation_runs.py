"""eval_conf in runs: the cadence of evaluation, generation on the demo model (left padding and
masks), chunks that log the metrics, and the report and dashboard drawing them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from finetune.config.validation import CONFIG_ADAPTER
from finetune.evaluate.chunk import due
from finetune.search.halving import halving_of
from tests.helpers import doc_of
from tests.test_evaluation import CUSTOM, config_with, halving


# ---------------------------------------------------------------- when metrics are computed


def concrete(**sections):
    return CONFIG_ADAPTER.validate_python(config_with(**sections))


def judged(sweep: dict, chunk: int, total: int = 8) -> bool:
    """Whether successive halving compares runs after `chunk` (0-based): what the controller puts in the task."""
    return chunk + 1 in halving_of(sweep).rungs(total)


def test_generation_every_n_chunks_the_last_and_at_rungs() -> None:
    every_third = {"metrics": ["rouge_l"], "generation": {"every_chunks": 3}}
    config = concrete(eval_conf=every_third)
    assert [due(config, chunk, 8, asked=True).generation for chunk in range(8)] == [False, False, True, False, False, True, False, True]
    assert not any(due(config, chunk, 8, asked=True).teacher_forced for chunk in range(8))  # no eval_loss asked for
    ranked = concrete(eval_conf=every_third, sweep=halving(metric="rouge_l"), experiment={"name": "t", "num_chunks": 8})
    # rungs at 1, 2 and 4 chunks done
    rungs = halving(metric="rouge_l")
    assert [chunk + 1 for chunk in range(8) if due(ranked, chunk, 8, False, judged(rungs, chunk)).generation] == [1, 2, 3, 4, 6, 8]


def test_the_teacher_forced_pass_follows_the_controller_and_the_rungs() -> None:
    config = concrete(sweep=halving(), experiment={"name": "t", "num_chunks": 8})
    assert [chunk + 1 for chunk in range(8) if due(config, chunk, 8, False, judged(halving(), chunk)).teacher_forced] == [1, 2, 4]
    assert all(due(config, chunk, 8, asked=True).teacher_forced for chunk in range(8))
    assert not any(due(config, chunk, 8, asked=True).generation for chunk in range(8))


# ---------------------------------------------------------------- generation on the demo model


@pytest.fixture(scope="module")
def demo_chat(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.templates import install_template, load_template

    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "model")
    install_template(load_template("chat-ml", tokenizer), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def settings(**values):
    return SimpleNamespace(**{"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0, "batch_size": 4, **values})


def test_a_batch_of_prompts_of_different_lengths_answers_as_one_at_a_time(demo_chat) -> None:
    from finetune.evaluate.generation import generate_answers, prompt_ids
    from finetune.evaluate.samples import EvalSample

    model, tokenizer = demo_chat
    questions = ["Hi", "What is 1 plus 2?", "Add 13 and 19, and say it twice in words.", "Write 7 as a word."]
    samples = [EvalSample([{"role": "user", "content": question}], "") for question in questions]
    assert len({len(prompt_ids(tokenizer, sample)) for sample in samples}) >= 3  # padding of several widths
    model.train()
    batched = generate_answers(model, tokenizer, samples, settings(), "cpu", tokenizer.eos_token_id)
    assert model.training  # the mode it was in is given back
    alone = generate_answers(model, tokenizer, samples, settings(batch_size=1), "cpu", tokenizer.eos_token_id)
    assert batched.completions == alone.completions and all(batched.completions)
    assert batched.samples == samples and batched.too_long == 0


def test_the_prompt_ends_with_the_template_s_generation_prompt(demo_chat) -> None:
    from finetune.evaluate.generation import prompt_ids
    from finetune.evaluate.samples import EvalSample

    _, tokenizer = demo_chat
    text = tokenizer.decode(prompt_ids(tokenizer, EvalSample([{"role": "user", "content": "Hi"}], "")))
    assert text.endswith("<|im_start|>assistant\n")


def test_a_prompt_too_long_for_the_model_is_skipped_and_counted_not_cut(demo_chat) -> None:
    from finetune.evaluate.generation import generate_answers
    from finetune.evaluate.samples import EvalSample

    model, tokenizer = demo_chat
    short = EvalSample([{"role": "user", "content": "Hi"}], "")
    long = EvalSample([{"role": "user", "content": "plus " * 2100}], "")
    answers = generate_answers(model, tokenizer, [long, short], settings(), "cpu", tokenizer.eos_token_id)
    assert answers.samples == [short] and answers.too_long == 1 and len(answers.completions) == 1


def test_samples_are_the_validation_prompts_and_last_answers(tmp_path) -> None:
    from finetune.evaluate.samples import eval_samples, sample_of
    from finetune.train.demo import sft_records, write_jsonl

    records = sft_records(3, seed=2)
    write_jsonl(tmp_path / "valid.jsonl", records)
    data = {"training_data": {"type": "CONCATENATION", "datasets": [{"path": str(tmp_path / "valid.jsonl")}]},
            "validation_data": {"type": "CONCATENATION", "datasets": [{"path": str(tmp_path / "valid.jsonl")}]}}
    samples = eval_samples(concrete(data_conf=data), limit=2)
    assert [sample.reference for sample in samples] == [record["messages"][-1]["content"] for record in records[:2]]
    assert all(sample.prompt[-1]["role"] == "user" for sample in samples)
    assert sample_of({"messages": [{"role": "assistant", "content": "alone"}]}, "sft") is None
    preference = {"prompt_messages": [{"role": "user", "content": "q"}],
                  "chosen_messages": [{"role": "assistant", "content": "yes"}], "rejected_messages": []}
    assert sample_of(preference, "dpo").reference == "yes"


@pytest.mark.slow
def test_a_chunk_logs_its_generation_metrics(tmp_path, demo_dir) -> None:
    """A chunk of a run with eval_conf: the metrics are in its outcome and go to the sink at its step."""
    from finetune.plan.build import build_plan
    from finetune.train.residency import Budgets
    from finetune.train.workbench import Workbench
    from tests.conftest import EXAMPLES

    text = (EXAMPLES / "sft-lora-grid.yaml").read_text().replace("demo/", f"{demo_dir}/")
    (tmp_path / "c.yaml").write_text(text)
    from finetune.config.loading import load_document

    eval_conf = ("eval_conf={metrics: [eval_loss, token_accuracy, exact_match, rouge_l], generation: {max_new_tokens: 4, "
                 f"max_samples: 4}}, custom: [{{name: words, function: '{CUSTOM}:words_per_answer'}}]}}")
    plan = build_plan(load_document(tmp_path / "c.yaml", overrides=["training_args.max_steps=2", "experiment.num_chunks=1", eval_conf]))
    run = plan.runs[0]
    logged: list = []
    (tmp_path / "exp").mkdir(exist_ok=True)
    bench = Workbench(tmp_path / "exp", "cpu", Budgets(0, 1 << 40), sink=lambda run_id, step, metrics: logged.append((step, metrics)))
    outcome = bench.train_chunk(run, CONFIG_ADAPTER.validate_python(run.config), 0, None, 4)
    bench.writer.close()
    assert {"eval_loss", "token_accuracy", "exact_match", "rouge_l", "words"} <= outcome.metrics.keys()
    assert outcome.metrics["token_accuracy"] == outcome.metrics["eval_mean_token_accuracy"]
    generated = [metrics for step, metrics in logged if "rouge_l" in metrics]
    assert generated == [{name: outcome.metrics[name] for name in ("token_accuracy", "exact_match", "rouge_l", "words")}]


@pytest.mark.slow
def test_a_broken_custom_metric_leaves_the_chunk_saved_and_training_on(tmp_path, demo_dir, caplog) -> None:
    """Both chunks of a run whose custom metric raises: each is trained, measured by the other metrics and saved."""
    from finetune.config.loading import load_document
    from finetune.plan.build import build_plan
    from finetune.train.residency import Budgets
    from finetune.train.workbench import Workbench
    from tests.conftest import EXAMPLES

    (tmp_path / "c.yaml").write_text((EXAMPLES / "sft-lora-grid.yaml").read_text().replace("demo/", f"{demo_dir}/"))
    eval_conf = ("eval_conf={metrics: [eval_loss, exact_match], generation: {max_new_tokens: 2, max_samples: 2}, "
                 f"custom: [{{name: boom, function: '{CUSTOM}:raises'}}]}}")
    overrides = ["training_args.max_steps=2", "experiment.num_chunks=2", eval_conf]
    run = build_plan(load_document(tmp_path / "c.yaml", overrides=overrides)).runs[0]
    config = CONFIG_ADAPTER.validate_python(run.config)
    (tmp_path / "exp").mkdir(exist_ok=True)
    bench = Workbench(tmp_path / "exp", "cpu", Budgets(0, 1 << 40))
    with caplog.at_level("WARNING"):
        outcomes = [bench.train_chunk(run, config, chunk, None, 2) for chunk in (0, 1)]
    bench.writer.close()
    assert [outcome.global_step for outcome in outcomes] == [1, 2]
    assert all("exact_match" in outcome.metrics and "boom" not in outcome.metrics for outcome in outcomes)
    assert all((tmp_path / "exp" / "runs" / run.run_id / f"chunk-{chunk}").is_dir() for chunk in (0, 1))
    assert "eval_conf.custom[0] (boom" in caplog.text and "boom from user metric" in caplog.text


@pytest.mark.parametrize("max_new_tokens,refused", [(127, False), (128, True), (4096, True)])
def test_run_refuses_max_new_tokens_that_fill_the_model_s_context(max_new_tokens, refused) -> None:
    from transformers import LlamaConfig

    from finetune.train.preflight import check_generation_room

    config = CONFIG_ADAPTER.validate_python(config_with(eval_conf={"metrics": ["rouge_l"], "generation": {"max_new_tokens": max_new_tokens}}))
    problems = check_generation_room(config, lambda c: LlamaConfig(max_position_embeddings=128))
    assert [path for path, _ in problems] == (["eval_conf.generation.max_new_tokens"] if refused else [])
    if refused:
        assert f"{max_new_tokens} new tokens" in problems[0][1] and "128-token context" in problems[0][1]


def test_the_context_is_not_read_without_generation_metrics() -> None:
    from finetune.train.preflight import check_generation_room

    config = CONFIG_ADAPTER.validate_python(config_with(eval_conf={"generation": {"max_new_tokens": 30000}}))
    assert check_generation_room(config, lambda c: pytest.fail("nothing to check")) == []


def test_run_s_preflight_reads_the_demo_model_s_context(demo_dir) -> None:
    from transformers import AutoConfig

    from finetune.train.preflight import preflight

    context = AutoConfig.from_pretrained(demo_dir / "model").max_position_embeddings
    tree = config_with(eval_conf={"custom": [{"name": "words", "function": f"{CUSTOM}:words_per_answer"}],
                                  "generation": {"max_new_tokens": context}})
    tree["run_conf"] = {**tree.get("run_conf", {}), "model": str(demo_dir / "model")}
    problems = preflight(CONFIG_ADAPTER.validate_python(tree), ["cpu"], lambda c: None)
    assert "eval_conf.generation.max_new_tokens" in [path for path, _ in problems]


@pytest.mark.slow
def test_a_sweep_ranked_by_a_broken_custom_metric_still_trains_every_run(tmp_path, demo_dir, monkeypatch) -> None:
    """Successive halving by a custom metric that raises and one that calls sys.exit: every run completes
    every chunk, and the report says that the metric was never measured."""
    import sqlite3
    from pathlib import Path

    from tests.test_training import demo_config, finetune, small

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))  # the workers import tests.custom_metrics
    config = demo_config(tmp_path, demo_dir, "sft-eval-metrics.yaml", "broken")
    custom = f"eval_conf.custom=[{{name: boom, function: '{CUSTOM}:raises'}}, {{name: bye, function: '{CUSTOM}:exits'}}]"
    result = finetune(tmp_path, "run", str(config), *small("broken", steps=2, chunks=2), "--set", "sweep.num_runs=2",
                      "--set", "sweep.metric=boom", "--set", "eval_conf.metrics=[eval_loss]", "--set", custom,
                      "--set", "eval_conf.generation={max_new_tokens: 2, max_samples: 2}")
    with sqlite3.connect(tmp_path / "runs" / "broken" / "state.db") as db:
        assert db.execute("SELECT state FROM runs").fetchall() == [("completed",)] * 2
        assert db.execute("SELECT COUNT(*) FROM chunks").fetchone() == (4,)
    assert "eval_conf.custom[0] (boom" in result.stderr and "eval_conf.custom[1] (bye" in result.stderr
    from finetune.track.report import report_markdown

    assert "has not been measured for any run" in report_markdown(tmp_path / "runs" / "broken")


# ---------------------------------------------------------------- report and dashboard


def evaluated_experiment(tmp_path, sweep: dict, drop: tuple[str, ...] = ()) -> tuple:
    """An experiment folder of three runs whose eval_conf has no eval_loss, with logged metrics (but `drop`)."""
    from finetune.plan.build import build_plan
    from finetune.schedule.store import StateStore

    custom = [{"name": "cost", "function": f"{CUSTOM}:reference_words", "direction": "min"}]
    tree = config_with(eval_conf={"metrics": ["rouge_l", "exact_match"], "custom": custom}, sweep=sweep,
                       training_args={"learning_rate": {"$list": [1e-4, 3e-4, 1e-3]}})
    plan = build_plan(doc_of(tree), train_examples=lambda config: 64)
    root = tmp_path / "exp"
    root.mkdir()
    (root / "plan.json").write_text(plan.model_dump_json())
    store = StateStore(root / "state.db")
    for index, run in enumerate(plan.runs):
        store.add_run(run.run_id, run.label, 4)
        metrics = {name: value for name, value in {"rouge_l": 0.1 * index, "exact_match": 0.5, "cost": 10.0 - index}.items()
                   if name not in drop}
        store.record_chunk(run.run_id, 0, 2, str(root / "c"), metrics, 1.0, 0.5, 0.1)
        store.log_metrics(run.run_id, 2, metrics)
    store.close()
    return root, [run.run_id for run in plan.runs]


@pytest.mark.parametrize("sweep,metric,direction", [
    ({"strategy": "grid"}, "rouge_l", "maximize"),  # no sweep.metric and no eval_loss: eval_conf's first
    (halving(num_runs=3, metric="cost"), "cost", "minimize"),
])
def test_dashboard_and_report_draw_and_rank_by_eval_conf_metrics(tmp_path, sweep, metric, direction) -> None:
    from finetune.dashboard.views import curves_view, runs_view
    from finetune.track.report import report_markdown

    root, run_ids = evaluated_experiment(tmp_path, sweep)
    view = runs_view(root)
    assert (view["metric"], view["direction"]) == (metric, direction)
    assert [run["run_id"] for run in view["runs"]] == run_ids[::-1]  # the last run has the best rouge_l and cost
    assert view["eval_metrics"] == ["rouge_l", "exact_match", "cost"]
    assert all({"rouge_l", "exact_match", "cost"} <= run["latest"].keys() for run in view["runs"])
    assert {"rouge_l", "exact_match", "cost"} <= curves_view(root).keys()
    report = report_markdown(root)
    others = [name for name in ("rouge_l", "exact_match", "cost") if name != metric]
    assert f"| rank | run | label | state | chunks | {' | '.join([metric, *others])} |" in report


def test_the_report_says_when_the_sweep_metric_was_never_measured(tmp_path) -> None:
    from finetune.track.report import report_markdown

    root, run_ids = evaluated_experiment(tmp_path, halving(num_runs=3, metric="cost"), drop=("cost",))
    report = report_markdown(root)
    assert "Not ranked: `cost` has not been measured for any run" in report and "Ranked by" not in report
    assert all(f"| - | `{run_id}` |" in report for run_id in run_ids)
    (tmp_path / "other").mkdir()
    measured, _ = evaluated_experiment(tmp_path / "other", halving(num_runs=3, metric="cost"), drop=("rouge_l",))
    assert "Ranked by `cost` (minimize)" in report_markdown(measured)


def test_the_report_command_cuts_no_run_id_nor_number_at_any_width(tmp_path) -> None:
    import os
    import subprocess
    import sys

    root, run_ids = evaluated_experiment(tmp_path, halving(num_runs=3, metric="cost"))
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "report", str(root)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    assert all(f"`{run_id}`" in result.stdout for run_id in run_ids) and "…" not in result.stdout
    assert "| rank | run | label | state | chunks | cost | rouge_l | exact_match | note |" in result.stdout


def test_the_report_of_an_experiment_whose_every_run_failed_says_so_and_each_error(tmp_path) -> None:
    from finetune.schedule.store import StateStore
    from finetune.track.report import report_markdown

    root, run_ids = evaluated_experiment(tmp_path, halving(num_runs=3, metric="cost"), drop=("cost",))
    store = StateStore(root / "state.db", create=False)
    for index, run_id in enumerate(run_ids[:-1]):
        store.set_state(run_id, "failed", f"ValidationError: 1 validation error for row {index}\n  bad | value\n" + "x" * 300)
    store.close()
    report = report_markdown(root)
    assert "every run failed" not in report  # one run did not fail: its metric is missing for another reason
    assert "has not been measured for any run" in report and "ValidationError: 1 validation error for row 0 bad \\| value x" in report
    assert "x" * 300 not in report and "…" in report  # a long message is cut
    store = StateStore(root / "state.db", create=False)
    store.set_state(run_ids[-1], "failed", "RuntimeError: out of memory")
    store.close()
    report = report_markdown(root)
    assert "Not ranked: every run failed before `cost` was measured" in report and "generation metric" not in report
    assert "RuntimeError: out of memory |" in report


def test_the_example_custom_metric_compares_final_numbers() -> None:
    from finetune.evaluate.examples import final_number_match

    completions = ["3 plus 4 is 7.", "3 plus 4 is 8.", "seven", "x"]
    references = ["3 plus 4 is 7."] * 3 + ["no number"]
    assert final_number_match([], completions, references) == pytest.approx(1 / 3)  # the last pair is left out


@pytest.mark.slow
def test_a_sharded_gang_generates_together_and_logs_the_metrics(tmp_path, demo_dir) -> None:
    """Two FSDP ranks on the CPU: every rank generates (the shards are gathered layer by layer), none waits
    for ever, and rank 0 reports the generation metrics of each chunk."""
    import json
    import sqlite3

    from tests.test_gangs import ON_CPU
    from tests.test_training import demo_config, finetune, small

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "gang")
    eval_conf = "eval_conf={metrics: [eval_loss, rouge_l], generation: {max_new_tokens: 4, max_samples: 4, batch_size: 2}}"
    finetune(tmp_path, "run", str(config), *small("gang", steps=4, chunks=2), *ON_CPU, "--set", "experiment.devices_per_run=2",
             "--set", "experiment.distributed=fsdp", "--set", "training_args.learning_rate=1e-3", "--set", eval_conf)
    with sqlite3.connect(tmp_path / "runs" / "gang" / "state.db") as db:
        rows = db.execute("SELECT chunk, metrics FROM chunks ORDER BY chunk").fetchall()
    assert [chunk for chunk, _ in rows] == [0, 1] and all("rouge_l" in json.loads(metrics) for _, metrics in rows)
