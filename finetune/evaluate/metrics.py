"""Generation metrics over strings: the built-ins (from rouge-score and sacrebleu) and a user's own.

Each takes the generated answers and their references in the same order and gives one number for
the whole sample. The libraries are imported when a metric is computed, never on import.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

Messages = list[dict[str, str]]
MetricFn = Callable[[list[str], list[str]], float]


def normalized(text: str) -> str:
    """Trimmed, with every run of whitespace one space: how exact_match compares answers."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(completions: list[str], references: list[str]) -> float:
    """The share of answers equal to their reference (after `normalized`), from 0 to 1."""
    _same_length(completions, references)
    if not completions:
        return 0.0
    return sum(normalized(c) == normalized(r) for c, r in zip(completions, references)) / len(completions)


def rouge_l(completions: list[str], references: list[str]) -> float:
    """The mean ROUGE-L F1 of the answers against their references (rouge-score's tokenizer), from 0 to 1."""
    from rouge_score import rouge_scorer

    _same_length(completions, references)
    if not completions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(reference, completion)["rougeL"].fmeasure for completion, reference in zip(completions, references)]
    return sum(scores) / len(scores)


def bleu(completions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation, exponential smoothing), from 0 to 100."""
    from sacrebleu.metrics import BLEU

    _same_length(completions, references)
    return float(BLEU().corpus_score(completions, [references]).score)


def chrf(completions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus chrF (character 6-grams, beta 2), from 0 to 100."""
    from sacrebleu.metrics import CHRF

    _same_length(completions, references)
    return float(CHRF().corpus_score(completions, [references]).score)


BUILTIN_FUNCTIONS: dict[str, MetricFn] = {"exact_match": exact_match, "rouge_l": rouge_l, "bleu": bleu, "chrf": chrf}


def _same_length(completions: list[str], references: list[str]) -> None:
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references")


@dataclass(frozen=True)
class Scorer:
    """The generation metrics of one run: built-in names and custom (name, `module:function`) pairs."""

    builtin: tuple[str, ...]
    custom: tuple[tuple[str, Callable[..., Any]], ...] = ()

    @classmethod
    def of(cls, eval_conf: Any) -> Scorer:
        from finetune.config.evaluation import load_function

        custom = tuple((metric.name, load_function(metric.function)) for metric in eval_conf.custom)
        return cls(tuple(eval_conf.generated), custom)

    def score(self, prompts: list[Messages], completions: list[str], references: list[str]) -> dict[str, float]:
        values = {name: BUILTIN_FUNCTIONS[name](completions, references) for name in self.builtin}
        for name, function in self.custom:
            values[name] = custom_value(name, function(prompts=prompts, completions=completions, references=references))
        return values


def custom_value(name: str, value: Any) -> float:
    """A custom metric's result as a float; anything but a finite number is an error naming the metric."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "__float__")):
        raise TypeError(f"custom metric {name} returned {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"custom metric {name} returned {number}, not a finite number")
    return number
