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


def positional_only(prompts, completions, references, /):
    return 1.0


def needs_more(prompts, completions, references, weight):
    return weight


def keywords_only(*, prompts, completions, references, weight=1.0):
    return weight


def anything(**kwargs):
    return float(len(kwargs))


# ---------------------------------------------------------------- hostile metrics (they run in the worker's sandbox)


def hangs(prompts, completions, references):
    import time

    time.sleep(3600)


def exits_hard(prompts, completions, references):
    import os

    os._exit(7)


def forks(prompts, completions, references):
    """Leaves a child process sleeping (holding the caller's stdout) and returns a value."""
    import os
    import time

    child = os.fork()
    if child == 0:
        time.sleep(3600)
        os._exit(0)
    if os.environ.get("FINETUNE_TEST_PID_DIR"):  # so that a test can see it is gone
        open(os.path.join(os.environ["FINETUNE_TEST_PID_DIR"], str(child)), "w").close()
    return 2.0


def leaves_a_thread(prompts, completions, references):
    import threading
    import time

    threading.Thread(target=time.sleep, args=(3600,), name="left-behind").start()
    return 3.0


def mutates(prompts, completions, references):
    """Empties and rewrites what it is given; later metrics and the worker's prompts must not see it."""
    for prompt in prompts:
        prompt.clear()
        prompt.append({"role": "user", "content": "mutated"})
    completions[:] = ["mutated"] * len(completions)
    references.clear()
    return 4.0


def too_much_memory(prompts, completions, references):
    return float(len(bytes(6 * 2**30)))  # beyond the 4 GB the tests give the sandbox (calloc: pages never touched)


def counts_calls(prompts, completions, references):
    """How often this process has called it: 1, 2, 3... while the sandbox's process is kept warm."""
    global CALLS
    CALLS = globals().get("CALLS", 0) + 1
    return float(CALLS)


def sees_the_sample_unchanged(prompts, completions, references):
    """Raises when an earlier metric's changes reached it (or the worker's prompts)."""
    assert references and all(reference != "mutated" for reference in references), references
    assert all(completion != "mutated" for completion in completions), completions
    assert all(message["content"] != "mutated" for prompt in prompts for message in prompt), prompts
    return 1.0


def a_reward(completions, reference=None, **kwargs):
    return [1.0 for _ in completions]


# ---------------------------------------------------------------- GRPO reward functions (they run in the worker's fence too)


def reward_hangs(completions, **kwargs):
    import time

    time.sleep(3600)


def reward_of_the_step(completions, trainer_state, **kwargs):
    """The trainer's step as each completion's reward: what a reward gets of trainer_state, as an object."""
    return [float(trainer_state.global_step) for _ in completions]
