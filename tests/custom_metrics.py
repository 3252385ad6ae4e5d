"""Custom evaluation metrics that the eval_conf tests name by `tests.custom_metrics:function`."""

from __future__ import annotations


def words_per_answer(prompts, completions, references):
    """The mean number of words per answer; checks that it is given the whole sample, in order."""
    assert len(prompts) == len(completions) == len(references)
    assert all(isinstance(prompt, list) and prompt[-1]["role"] == "user" for prompt in prompts)
    return sum(len(completion.split()) for completion in completions) / max(1, len(completions))


def reference_words(prompts, completions, references):
    return float(sum(len(reference.split()) for reference in references))


def not_a_number(prompts, completions, references):
    return "high"


NOT_CALLABLE = 3
