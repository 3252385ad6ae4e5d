"""Custom metrics to start from (`eval_conf.custom`), fitted to the demo's arithmetic conversations.

A custom metric is any function `(prompts, completions, references) -> float` over the whole
generated sample; name it in a config as `package.module:function`.
"""

from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_number_match(prompts: list[Any], completions: list[str], references: list[str]) -> float:
    """The share of answers whose last number is the reference's last number (a sum, say), from 0 to 1;
    an answer without a number is wrong, a reference without one is left out."""
    scored = [(_last_number(completion), expected) for completion, reference in zip(completions, references)
              if (expected := _last_number(reference)) is not None]
    if not scored:
        return 0.0
    return sum(found == expected for found, expected in scored) / len(scored)


def _last_number(text: str) -> str | None:
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None
