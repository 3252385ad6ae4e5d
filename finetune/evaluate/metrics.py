"""Generation metrics over strings: the built-ins (from rouge-score and sacrebleu) and a user's own.

Each takes the generated answers and their references in the same order and gives one number for
the whole sample. The libraries are imported when a metric is computed, never on import.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

Messages = list[dict[str, str]]
MetricFn = Callable[[list[str], list[str]], float]
logger = logging.getLogger(__name__)


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
class CustomFunction:
    """A user's metric as `eval_conf.custom[index]` names it; `function` None: it could not be loaded."""

    index: int
    name: str
    path: str
    function: Callable[..., Any] | None

    @property
    def label(self) -> str:
        return f"eval_conf.custom[{self.index}] ({self.name}, {self.path})"


@dataclass(frozen=True)
class Scorer:
    """The generation metrics of one run: built-in names and the user's custom functions."""

    builtin: tuple[str, ...]
    custom: tuple[CustomFunction, ...] = ()

    @classmethod
    def of(cls, eval_conf: Any) -> Scorer:
        custom = tuple(_loaded(index, metric.name, metric.function) for index, metric in enumerate(eval_conf.custom))
        return cls(tuple(eval_conf.generated), custom)

    def score(self, prompts: list[Messages], completions: list[str], references: list[str]) -> dict[str, float]:
        """The metrics' values; a custom metric that fails (see `call_custom`) is left out."""
        values = {name: BUILTIN_FUNCTIONS[name](completions, references) for name in self.builtin}
        for metric in self.custom:
            value = call_custom(metric, prompts, completions, references)
            if value is not None:
                values[metric.name] = value
        return values


def _loaded(index: int, name: str, path: str) -> CustomFunction:
    """The custom function, or None in it (with a warning) when it no longer loads in this process."""
    from finetune.config.evaluation import load_function

    try:
        return CustomFunction(index, name, path, load_function(path))
    except Exception as error:  # validated, but the module may have changed or fail on another machine
        logger.warning("custom metric eval_conf.custom[%d] (%s, %s) cannot be loaded: %s; it is not measured",
                       index, name, path, error)
        return CustomFunction(index, name, path, None)


def call_custom(metric: CustomFunction, prompts: list[Messages], completions: list[str],
                references: list[str]) -> float | None:
    """The custom metric's value, or None when it raises (SystemExit included: a user's sys.exit must not end
    the worker; KeyboardInterrupt still does) or returns no finite number. A broken metric is then missing
    for this evaluation, as a metric not measured at a chunk is: the chunk is still saved and training goes on."""
    if metric.function is None:
        return None
    try:
        return custom_value(metric.name, metric.function(prompts=prompts, completions=completions, references=references))
    except (Exception, SystemExit) as error:
        logger.warning("custom metric %s failed, no %s for this evaluation: %s: %s", metric.label, metric.name,
                       type(error).__name__, error)
        return None


def custom_value(name: str, value: Any) -> float:
    """A custom metric's result as a float; anything but a finite number is an error naming the metric."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_") or not (
            isinstance(value, (int, float)) or hasattr(value, "__float__")):  # numpy's bool is no bool
        raise TypeError(f"custom metric {name} returned {type(value).__name__}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"custom metric {name} returned {number}, not a finite number")
    return number
