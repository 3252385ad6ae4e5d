"""GRPO reward functions: the built-in demo ones, and a user's `module:function`, which runs behind the fence
of `evaluate.sandbox` (a child process of the worker, on copies of its arguments, with a time limit)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, Callable

from finetune.config.rewards_catalog import BUILTIN_REWARDS
from finetune.evaluate.sandbox import SandboxUser, UserCodeFailure, UserCodeSandbox

RewardFn = Callable[..., list[float]]


def _text(completion: Any) -> str:
    if isinstance(completion, list):
        return " ".join(message.get("content", "") for message in completion)
    return str(completion)


def length_penalty(completions: list[Any], **_: Any) -> list[float]:
    return [-abs(len(_text(c).split()) - 32) / 32 for c in completions]


def reference_match(completions: list[Any], reference: list[str] | None = None, **_: Any) -> list[float]:
    references = reference or [""] * len(completions)
    return [1.0 if ref and str(ref) in _text(c) else 0.0 for c, ref in zip(completions, references)]


def format_chat(completions: list[Any], **_: Any) -> list[float]:
    return [1.0 if re.search(r"[.!?]\s*$", _text(c)) else 0.0 for c in completions]


BUILTINS: dict[str, RewardFn] = {
    "length_penalty": length_penalty,
    "reference_match": reference_match,
    "format_chat": format_chat,
}
assert set(BUILTINS) == set(BUILTIN_REWARDS)


REWARD_MEMORY_BYTES = 8 * 2**30
logger = logging.getLogger(__name__)


class RewardFence(SandboxUser):
    """This process's fence for user reward functions: one warm child process, and the failures since the
    worker last took them (`take_failures`)."""

    def __init__(self) -> None:
        self.sandbox: Any = None
        self.failures: list[Any] = []

    def call(self, function: str, timeout_s: float, **arguments: Any) -> Any:
        if self.sandbox is None:
            self.sandbox = UserCodeSandbox(REWARD_MEMORY_BYTES)
        return self.sandbox.call(function, timeout_s, many=True, namespaces=("trainer_state",), **arguments)


FENCE = RewardFence()


class FencedReward:
    """A user's reward function as TRL calls it (keywords: prompts, completions, completion_ids, the data
    set's columns, trainer_state, log_extra, log_metric), run in the fence. What cannot be copied as JSON
    (the logging callbacks) is left out; trainer_state arrives as an object of its plain fields. A call that
    fails, hangs or misbehaves gives no reward (None, for each completion) and a `UserCodeFailure`."""

    def __init__(self, path: str, index: int, timeout_s: float, fence: RewardFence = FENCE) -> None:
        self.path, self.index, self.timeout_s, self.fence = path, index, timeout_s, fence
        self.__name__ = path.partition(":")[2]  # TRL names the reward's logged columns after it

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        arguments = {"prompts": prompts, "completions": completions}
        for key, value in kwargs.items():
            if key == "trainer_state" and dataclasses.is_dataclass(value):
                value = {name: item for name, item in vars(value).items() if _plain(item)}
            if _plain(value):
                arguments[key] = value
        outcome = self.fence.call(self.path, self.timeout_s, **arguments)
        if outcome.problem:
            source = f"grpo_args.reward_functions[{self.index}]"
            logger.warning("reward function %s (%s): %s", source, self.path, outcome.problem)
            self.fence.failures.append(UserCodeFailure(source, self.__name__, self.path, outcome.problem))
        values = outcome.value
        if not isinstance(values, list) or len(values) != len(completions):
            return [None] * len(completions)  # no reward from this function for these completions
        return values


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def resolve_reward(name: str, index: int = 0, timeout_s: float = 60.0) -> RewardFn:
    """A built-in reward, or the user's `module:function` behind the fence (never imported in this process)."""
    if name in BUILTINS:
        return BUILTINS[name]
    return FencedReward(name, index, timeout_s)
