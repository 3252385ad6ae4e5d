"""training_args.eval_on_start: an evaluation of the untrained run, logged at step 0; the answers that
generation metrics keep (at most 8 per evaluation), from the worker to state.db, the report and the dashboard."""

from __future__ import annotations

import json

import pytest

from finetune.config.validation import CONFIG_ADAPTER
from tests.conftest import EXAMPLES

EVAL_CONF = "eval_conf={metrics: [eval_loss, exact_match], generation: {max_new_tokens: 3, max_samples: 10}}"


def planned(tmp_path, demo_dir, *overrides):
    from finetune.config.loading import load_document
    from finetune.plan.build import build_plan

    (tmp_path / "c.yaml").write_text((EXAMPLES / "sft-lora-grid.yaml").read_text().replace("demo/", f"{demo_dir}/"))
    return build_plan(load_document(tmp_path / "c.yaml", overrides=["training_args.max_steps=2", "experiment.num_chunks=1",
                                                                     EVAL_CONF, *overrides])).runs


@pytest.mark.slow
def test_the_base_is_evaluated_at_step_0_once_per_base_and_answers_are_kept(tmp_path, demo_dir, monkeypatch) -> None:
    from finetune.evaluate.chunk import GenerationEvaluator
    from finetune.train.residency import Budgets
    from finetune.train.workbench import Workbench

    runs = planned(tmp_path, demo_dir, "training_args.eval_on_start=true", "peft_conf.peft_kwargs.r=!list [4]")
    assert len(runs) == 2  # two learning rates on one base
    generated: list[int] = []
    measure = GenerationEvaluator.measure

    def counted(self, session, *args):
        generated.append(session.step)
        return measure(self, session, *args)

    monkeypatch.setattr(GenerationEvaluator, "measure", counted)
    logged: list = []
    (tmp_path / "exp").mkdir(exist_ok=True)
    bench = Workbench(tmp_path / "exp", "cpu", Budgets(0, 1 << 40), sink=lambda run_id, step, metrics: logged.append((run_id, step, metrics)))
    outcomes = [bench.train_chunk(run, CONFIG_ADAPTER.validate_python(run.config), 0, None, 10) for run in runs]
    bench.writer.close()
    at_start = {}
    for run_id, step, metrics in logged:
        if step == 0:
            at_start.setdefault(run_id, {}).update(metrics)
    first, second = (at_start[run.run_id] for run in runs)
    assert {"eval_loss", "exact_match"} <= first.keys() and first["eval_loss"] == second["eval_loss"]
    assert first["exact_match"] == second["exact_match"]
    assert generated == [0, 2, 2]  # the second run is its base at step 0: the first run's measurement is reused
    for outcome in outcomes:
        steps = [answer.step for answer in outcome.answers]
        assert steps == [0] * 8 + [2] * 8  # 10 prompts, 8 kept per evaluation
        assert [answer.position for answer in outcome.answers[:8]] == list(range(8))
    validation = [json.loads(line) for line in (demo_dir / "data" / "sft_valid.jsonl").read_text().splitlines()]
    kept = outcomes[0].answers[0]
    assert kept.reference == validation[0]["messages"][-1]["content"]
    assert json.loads(kept.prompt) == validation[0]["messages"][:-1] and kept.question == validation[0]["messages"][-2]["content"]
    assert outcomes[0].answers[:8] == outcomes[1].answers[:8]


@pytest.mark.slow
def test_without_eval_on_start_nothing_is_logged_at_step_0(tmp_path, demo_dir) -> None:
    from finetune.train.residency import Budgets
    from finetune.train.workbench import Workbench

    run = planned(tmp_path, demo_dir, "training_args.learning_rate=!list [1.0e-3]", "peft_conf.peft_kwargs.r=!list [4]")[0]
    logged: list = []
    (tmp_path / "exp").mkdir(exist_ok=True)
    bench = Workbench(tmp_path / "exp", "cpu", Budgets(0, 1 << 40), sink=lambda run_id, step, metrics: logged.append(step))
    outcome = bench.train_chunk(run, CONFIG_ADAPTER.validate_python(run.config), 0, None, 10)
    bench.writer.close()
    assert 0 not in logged and {answer.step for answer in outcome.answers} == {2}


def test_answers_are_stored_replaced_when_measured_again_and_read_back(tmp_path) -> None:
    from finetune.evaluate.samples import EvalSample, kept_answers
    from finetune.schedule.store import StateStore

    samples = [EvalSample([{"role": "user", "content": f"q{index}"}], f"r{index}") for index in range(10)]
    store = StateStore(tmp_path / "state.db")
    store.log_answers("a", kept_answers(4, samples, [f"first {index}" for index in range(10)]))
    store.log_answers("a", kept_answers(4, samples, [f"again {index}" for index in range(10)]))
    store.log_answers("b", kept_answers(0, samples[:2], ["x", "y"]))
    answers = store.answers("a")
    assert len(answers) == 8 and [answer["completion"] for answer in answers][:2] == ["again 0", "again 1"]
    assert answers[0]["prompt"] == [{"role": "user", "content": "q0"}] and answers[0]["reference"] == "r0"
    assert [answer["run_id"] for answer in store.answers()] == ["a"] * 8 + ["b"] * 2


def test_the_report_shows_base_scores_and_the_best_runs_answers_side_by_side(tmp_path) -> None:
    from finetune.evaluate.samples import EvalSample, kept_answers
    from finetune.schedule.store import StateStore
    from finetune.track.report import report_markdown
    from tests.test_evaluation import halving
    from tests.test_evaluation_runs import evaluated_experiment

    root, run_ids = evaluated_experiment(tmp_path, halving(num_runs=3, metric="cost"))
    samples = [EvalSample([{"role": "user", "content": f"Date: day {index}"}], f"2021-01-0{index}") for index in (1, 2)]
    store = StateStore(root / "state.db")
    for index, run_id in enumerate(run_ids):
        store.log_metrics(run_id, 0, {"exact_match": 0.0, "rouge_l": 0.05, "cost": 20.0})
        store.log_answers(run_id, kept_answers(0, samples, ["The date is", "The date is"]))
        store.log_answers(run_id, kept_answers(2, samples, [f"run {index} a", f"run {index} | b"]))
    store.close()
    report = report_markdown(root)
    assert "| - | base | the model before training (step 0) | | 0 | 20.0000 | 0.0500 | 0.0000 |" in report
    best = run_ids[-1]  # the lowest cost
    assert f"| prompt | reference | base (step 0) | `{best}` (step 2) |" in report
    assert "| Date: day 2 | 2021-01-02 | The date is | run 2 \\| b |" in report
    # Runs from different base models: each run's own base value next to its value.
    store = StateStore(root / "state.db")
    store.log_metrics(run_ids[0], 0, {"cost": 30.0})
    store.close()
    assert "(base 30.0000)" in report_markdown(root) and "| - | base |" not in report_markdown(root)
