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


def raises(prompts, completions, references):
    raise RuntimeError("boom from user metric")


def not_finite(prompts, completions, references):
    return float("nan")


def infinite(prompts, completions, references):
    return float("inf")


def nothing(prompts, completions, references):
    return None


def a_bool(prompts, completions, references):
    return True


def a_numpy_bool(prompts, completions, references):
    import numpy

    return numpy.bool_(True)


def exits(prompts, completions, references):
    import sys

    sys.exit(3)


def interrupted(prompts, completions, references):
    raise KeyboardInterrupt


def wrong_arguments(a, b):
    return 1.0


def keywords_only(*, prompts, completions, references, weight=1.0):
    return weight


def anything(**kwargs):
    return float(len(kwargs))
