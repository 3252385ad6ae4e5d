"""eval_conf: the built-in metrics by hand, custom metrics by module path, the config's checks and
sweep.metric's (what is measured and drawn in runs: test_evaluation_runs.py)."""

from __future__ import annotations

import copy

import pytest

from finetune.config.evaluation import EvalConfig
from finetune.config.validation import CONFIG_ADAPTER
from finetune.evaluate.metrics import Scorer, bleu, chrf, exact_match, rouge_l
from tests.conftest import BASE_SFT
from tests.helpers import doc_of, issues_of, schema_errors

CUSTOM = "tests.custom_metrics"


def config_with(**sections) -> dict:
    tree = copy.deepcopy(BASE_SFT)
    tree.update(sections)
    return tree


def halving(**sweep) -> dict:
    return {"strategy": "successive_halving", "num_runs": 2, **sweep}


# ---------------------------------------------------------------- built-in metrics by hand


def test_exact_match_compares_trimmed_answers_with_whitespace_collapsed() -> None:
    completions = ["2 plus 3 is 5.", "  2 plus  3\nis 5. ", "2 plus 3 is 6.", "2 Plus 3 is 5."]
    assert exact_match(completions, ["2 plus 3 is 5."] * 4) == 0.5  # case counts; spacing does not


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence() -> None:
    # LCS("the cat sat", "the cat sat down") = 3 words: precision 3/3, recall 3/4, F1 = 2 * 0.75 / 1.75
    assert rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(6 / 7)
    # Averaged over examples: (6/7 + 0) / 2; no word in common gives 0
    assert rouge_l(["the cat sat", "dogs"], ["the cat sat down", "birds fly"]) == pytest.approx(3 / 7)


def test_bleu_is_the_geometric_mean_of_ngram_precisions() -> None:
    # 5 words, the last differs: 1-4-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths, no brevity penalty
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(expected)
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_chrf_averages_character_ngram_precision_and_recall() -> None:
    # "abc" vs "abd": unigrams 2/3 match both ways, bigrams 1/2, trigrams 0; precision = recall = 7/18
    assert chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18)
    assert chrf(["same words"], ["same words"]) == pytest.approx(100.0)


def test_a_metric_refuses_samples_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="2 completions for 1 references"):
        exact_match(["a", "b"], ["a"])


# ---------------------------------------------------------------- custom metrics


def test_a_custom_metric_is_loaded_from_its_module_path_and_scores_the_sample() -> None:
    eval_conf = EvalConfig.model_validate({
        "metrics": ["exact_match"],
        "custom": [{"name": "answer_words", "function": f"{CUSTOM}:words_per_answer"},
                   {"name": "reference_words", "function": f"{CUSTOM}:reference_words", "direction": "min"}],
    })
    prompts = [[{"role": "user", "content": "Add 1 and 2."}], [{"role": "user", "content": "Write 3 as a word."}]]
    values = Scorer.of(eval_conf).score(prompts, ["1 plus 2 is 3.", "three"], ["1 plus 2 is 3.", "3 is three."])
    assert values == {"exact_match": 0.5, "answer_words": 3.0, "reference_words": 8.0}
    assert eval_conf.directions() == {"exact_match": "maximize", "answer_words": "maximize", "reference_words": "minimize"}


@pytest.mark.parametrize("function,words", [
    ("raises", "RuntimeError: boom from user metric"),
    ("not_a_number", "returned str, not a number"),
    ("nothing", "returned NoneType, not a number"),
    ("a_bool", "returned bool, not a number"),
    ("a_numpy_bool", "returned bool, not a number"),
    ("not_finite", "returned nan, not a finite number"),
    ("infinite", "returned inf, not a finite number"),
    ("exits", "SystemExit: 3"),
])
def test_a_failing_custom_metric_is_a_warning_naming_it_and_its_value_is_absent(function, words, caplog) -> None:
    eval_conf = EvalConfig.model_validate({"metrics": ["exact_match"], "custom": [
        {"name": "fine", "function": f"{CUSTOM}:reference_words"}, {"name": "odd", "function": f"{CUSTOM}:{function}"}]})
    with caplog.at_level("WARNING"):
        values = Scorer.of(eval_conf).score([[]], ["a"], ["a"])
    assert values == {"exact_match": 1.0, "fine": 1.0}  # the others are still measured
    (record,) = caplog.records
    assert f"eval_conf.custom[1] (odd, {CUSTOM}:{function})" in record.getMessage() and words in record.getMessage()


@pytest.mark.parametrize("function,words", [
    ("no_such_package.metrics:score", "cannot import module 'no_such_package.metrics'"),
    (f"{CUSTOM}:missing", f"module '{CUSTOM}' has no 'missing'"),
    (f"{CUSTOM}:NOT_CALLABLE", "is not callable"),
    (f"{CUSTOM}.words_per_answer", "pattern"),
    (f"{CUSTOM}:wrong_arguments", "cannot be called as function(prompts=..., completions=..., references=...)"),
    ("os:system", "may come from an `import *`"),
    ("builtins:eval", "built-in module"),
    ("builtins:max", "built-in module"),
    ("math:sqrt", "has no Python source"),
    ("venv.__main__:main", "__main__ module"),
    ("unittest.__main__:main", "__main__ module"),
    ("unittest.mock:MagicMock", "is a class"),
    ("functools:partial", "not a function defined with `def`"),
    ("asyncio.tasks:sleep", "coroutine function"),
    ("asyncio:sleep", "may come from an `import *`"),
    ("json.decoder:py_scanstring", "it takes no 'prompts', 'completions', 'references'"),
    (f"{CUSTOM}:positional_only", "'prompts' is positional-only"),
    (f"{CUSTOM}:needs_more", "it also needs 'weight'"),
    ("tests:anything", "has no Python source"),
    ("tests.custom_metrics.sub:anything", "'tests.custom_metrics' is not a package"),
])
def test_a_bad_custom_function_is_a_validation_error_with_its_path(function, words) -> None:
    tree = config_with(eval_conf={"custom": [{"name": "mine", "function": function}]})
    (issue,) = issues_of(tree)
    assert issue.path == "eval_conf.custom[0].function"
    assert words in issue.message + (issue.allowed or "")
    assert function in (issue.given or "")


@pytest.mark.parametrize("function", ["keywords_only", "anything", "words_per_answer"])
def test_a_function_taking_the_three_keywords_is_accepted(function) -> None:
    assert issues_of(config_with(eval_conf={"custom": [{"name": "mine", "function": f"{CUSTOM}:{function}"}]})) == []


@pytest.mark.parametrize("name", ["entropy", "mean_token_accuracy", "num_tokens", "train_loss", "train_runtime",
                                  "train_samples_per_second", "total_flos", "eval_runtime", "num_input_tokens_seen",
                                  "aux_loss", "test_loss", "loss", "grad_norm", "kl", "reward_std"])
def test_a_custom_metric_may_not_take_a_name_the_trainer_logs(name) -> None:
    (issue,) = issues_of(config_with(eval_conf={"custom": [{"name": name, "function": f"{CUSTOM}:reference_words"}]}))
    assert issue.path == "eval_conf.custom[0].name"
    assert "one the trainer logs" in issue.message and "train_*" in issue.message and "mean_token_accuracy" in issue.message


def test_trainer_names_are_reserved() -> None:
    """Every metric name an SFT run logs (with token accuracy and the end-of-training summary) is refused."""
    from finetune.config.evaluation import RESERVED_METRIC_NAMES, RESERVED_METRIC_PREFIXES

    logged = ["loss", "grad_norm", "learning_rate", "entropy", "num_tokens", "mean_token_accuracy", "epoch", "train_runtime",
              "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss", "eval_loss",
              "eval_runtime", "eval_entropy"]
    assert all(name in RESERVED_METRIC_NAMES or name.startswith(RESERVED_METRIC_PREFIXES) for name in logged)


def test_a_duplicate_custom_name_given_by_set_is_reported_at_its_set(tmp_path) -> None:
    import json

    from finetune.config.loading import load_document
    from finetune.config.validation import validate_document

    (tmp_path / "c.json").write_text(json.dumps(BASE_SFT))
    metric = f"{{name: a, function: '{CUSTOM}:reference_words'}}"
    doc = load_document(tmp_path / "c.json", overrides=[f"eval_conf.custom=[{metric}, {metric}]"])
    assert [(issue.path, issue.location) for issue in validate_document(doc)] == [("eval_conf.custom", "--set eval_conf.custom")]


@pytest.mark.parametrize("change,says", [
    ("eval_conf.generation.temperature=-1", r"eval_conf.generation.temperature: .*greater than or equal to 0 \(given: -1"),
    ("eval_conf.metrics=[rouge]", r"eval_conf.metrics\[0\]: .*\(given: 'rouge'; allowed: .*rouge_l"),
    (f"eval_conf.custom=[{{name: entropy, function: '{CUSTOM}:reference_words'}}]", r"eval_conf.custom: .*cannot add"),
])
def test_a_rejected_clone_says_what_was_given_and_what_is_allowed(tmp_path, change, says) -> None:
    from finetune.schedule.control import RequestRejected
    from finetune.schedule.requests import submit_request
    from tests.test_experiment_folder import make_experiment, run_ids

    root = make_experiment(tmp_path)
    with pytest.raises(RequestRejected, match=says):
        submit_request(root, "clone", run_ids(root)[0], {"set": [change], "warm_start": False})


@pytest.mark.parametrize("eval_conf,path,words", [
    ({"metrics": ["rouge"]}, "eval_conf.metrics[0]", "not one of the allowed values"),
    ({"metrics": []}, "eval_conf.metrics", "at least 1"),
    ({"metrics": ["bleu", "bleu"]}, "eval_conf.metrics", "bleu listed more than once"),
    ({"custom": [{"name": "rouge_l", "function": f"{CUSTOM}:reference_words"}]}, "eval_conf.custom[0].name", "built-in"),
    ({"custom": [{"name": "eval_mine", "function": f"{CUSTOM}:reference_words"}]}, "eval_conf.custom[0].name", "built-in"),
    ({"custom": [{"name": "a", "function": f"{CUSTOM}:reference_words"}] * 2}, "eval_conf.custom", "defined more than once"),
    ({"generation": {"max_new_tokens": 0}}, "eval_conf.generation.max_new_tokens", "greater than or equal to 1"),
    ({"generation": {"temperature": -1}}, "eval_conf.generation.temperature", "greater than or equal to 0"),
    ({"generation": {"every_chunks": 0}}, "eval_conf.generation.every_chunks", "greater than or equal to 1"),
    ({"generation": {"top_k": 5}}, "eval_conf.generation.top_k", "unknown key"),
])
def test_bad_eval_conf_names_the_key(eval_conf, path, words) -> None:
    issues = issues_of(config_with(eval_conf=eval_conf))
    assert [issue.path for issue in issues] == [path]
    assert words in issues[0].message


def test_method_limits_on_metrics() -> None:
    dpo = config_with(method="dpo", eval_conf={"metrics": ["eval_loss", "token_accuracy"]})
    dpo.pop("training_args")
    dpo["training_args"] = {"learning_rate": 1e-4}
    (issue,) = issues_of(dpo)
    assert issue.path == "eval_conf" and "SFT's evaluation only" in issue.message
    grpo = config_with(method="grpo", grpo_args={"reward_functions": ["format_chat"]}, training_args={"learning_rate": 1e-4},
                       eval_conf={"metrics": ["rouge_l"]})
    (issue,) = issues_of(grpo)
    assert issue.path == "eval_conf" and "rewards" in issue.message


def test_eval_conf_is_in_the_schema_and_a_knob_like_any_value() -> None:
    tree = config_with(eval_conf={"metrics": {"$list": [["eval_loss"], ["eval_loss", "rouge_l"]]},
                                  "generation": {"max_new_tokens": {"$list": [8, 16]}}})
    assert issues_of(tree) == [] and schema_errors(tree) == []
    assert schema_errors(config_with(eval_conf={"metrics": ["rouge"]}))


def test_the_default_is_eval_loss_only() -> None:
    config = CONFIG_ADAPTER.validate_python(copy.deepcopy(BASE_SFT))
    assert config.eval_conf.metrics == ["eval_loss"] and not config.eval_conf.needs_generation


# ---------------------------------------------------------------- sweep.metric


def test_sweep_metric_must_be_produced_by_the_runs() -> None:
    (issue,) = issues_of(config_with(eval_conf={"metrics": ["eval_loss", "rouge_l"]}, sweep=halving(metric="bleu")))
    assert issue.path == "sweep.metric" and "do not produce bleu" in issue.message
    assert issue.allowed.endswith("eval_loss, rouge_l")
    (issue,) = issues_of(config_with(eval_conf={"metrics": ["rouge_l"]}, sweep=halving()))
    assert issue.path == "sweep.metric" and "eval_loss" in issue.message  # the default metric too
    custom = {"metrics": ["eval_loss"], "custom": [{"name": "words", "function": f"{CUSTOM}:reference_words"}]}
    assert issues_of(config_with(eval_conf=custom, sweep=halving(metric="words"))) == []


def test_every_candidate_of_an_eval_conf_knob_must_produce_the_metric() -> None:
    tree = config_with(eval_conf={"metrics": {"$list": [["rouge_l"], ["eval_loss"]]}}, sweep=halving(metric="rouge_l"))
    (issue,) = issues_of(tree)
    assert issue.path == "sweep.metric" and "eval_conf.metrics[1]" in issue.message


def test_a_direction_against_the_metric_is_an_error() -> None:
    (issue,) = issues_of(config_with(eval_conf={"metrics": ["chrf"]}, sweep=halving(metric="chrf", direction="min")))
    assert issue.path == "sweep.direction" and "better when higher" in issue.message
    custom = {"custom": [{"name": "cost", "function": f"{CUSTOM}:reference_words", "direction": "minimize"}]}
    (issue,) = issues_of(config_with(eval_conf=custom, sweep=halving(metric="cost", direction="maximize")))
    assert issue.path == "sweep.direction" and "better when lower" in issue.message


def test_generation_metrics_without_validation_data_are_an_error() -> None:
    data = {**BASE_SFT["data_conf"], "validation_data": {"type": "NONE"}}
    (issue,) = issues_of(config_with(data_conf=data, eval_conf={"metrics": ["eval_loss", "bleu"]}))
    assert issue.path == "eval_conf" and "validation_data is NONE" in issue.message
    assert issues_of(config_with(data_conf=data, eval_conf={"metrics": ["eval_loss"]})) == []


def test_groups_are_checked_each_with_its_own_eval_conf() -> None:
    tree = config_with(sweep=halving(metric="rouge_l"),
                       groups=[{"eval_conf": {"metrics": ["rouge_l"]}}, {"eval_conf": {"metrics": ["bleu"]}}])
    (issue,) = issues_of(tree)
    assert issue.path == "groups[1]: sweep.metric"


def test_the_plan_ranks_by_the_metric_s_own_direction() -> None:
    from finetune.plan.build import build_plan
    from finetune.track.ranking import ranking_metric

    custom = {"metrics": ["rouge_l"], "custom": [{"name": "cost", "function": f"{CUSTOM}:reference_words", "direction": "min"}]}
    for metric, direction in (("rouge_l", "maximize"), ("cost", "minimize")):
        tree = config_with(eval_conf=custom, sweep=halving(metric=metric), training_args={"learning_rate": {"$list": [1e-4, 2e-4]}})
        plan = build_plan(doc_of(tree), train_examples=lambda config: 64)
        assert plan.sweeps[0]["direction"] == direction
        assert ranking_metric(plan) == (metric, direction)
