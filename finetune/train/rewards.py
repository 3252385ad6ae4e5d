"""GRPO reward functions: the built-in demo ones, and `module:function` imports."""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from finetune.config.rewards_catalog import BUILTIN_REWARDS

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


def resolve_reward(name: str) -> RewardFn:
    if name in BUILTINS:
        return BUILTINS[name]
    module_name, _, attribute = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"grpo_args.reward_functions: cannot import '{name}': {error}") from None
    if not callable(function):
        raise ValueError(f"grpo_args.reward_functions: '{name}' is not callable")
    return function
