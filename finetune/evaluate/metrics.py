"""Generation metrics over strings: the built-ins (from rouge-score and sacrebleu) and a user's own.

Each takes the generated answers and their references in the same order and gives one number for
the whole sample. The libraries are imported when a metric is computed, never on import.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from finetune.evaluate.sandbox import SandboxUser, UserCodeFailure, UserCodeSandbox

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
    """A user's metric as `eval_conf.custom[index]` names it."""

    index: int
    name: str
    path: str

    @property
    def source(self) -> str:
        return f"eval_conf.custom[{self.index}]"

    @property
    def label(self) -> str:
        return f"{self.source} ({self.name}, {self.path})"


@dataclass
class Scorer(SandboxUser):
    """The generation metrics of one run: built-in names, and the user's custom functions, which run in
    `sandbox` (`evaluate.sandbox`: a child process, on copies of the sample, with a time limit)."""

    builtin: tuple[str, ...]
    custom: tuple[CustomFunction, ...] = ()
    sandbox: Any = None
    timeout_s: float = 60.0
    failures: list[Any] = field(default_factory=list)  # `evaluate.sandbox.UserCodeFailure`s since the caller took them

    @classmethod
    def of(cls, eval_conf: Any, sandbox: Any = None) -> Scorer:
        """`sandbox`: the worker's (`evaluate.sandbox.UserCodeSandbox`); None: one of its own, when there are custom metrics."""
        custom = tuple(CustomFunction(index, metric.name, metric.function) for index, metric in enumerate(eval_conf.custom))
        if sandbox is None and custom:
            sandbox = UserCodeSandbox(int(eval_conf.custom_memory_gb * 2**30))
        return cls(tuple(eval_conf.generated), custom, sandbox, eval_conf.custom_timeout_s)

    def score(self, prompts: list[Messages], completions: list[str], references: list[str]) -> dict[str, float]:
        """The metrics' values; a custom metric that fails is left out (a warning, and one of `failures`)."""
        values = {name: BUILTIN_FUNCTIONS[name](completions, references) for name in self.builtin}
        for metric in self.custom:
            outcome = self.sandbox.call(metric.path, self.timeout_s, prompts=prompts, completions=completions,
                                        references=references)
            if outcome.value is not None:
                values[metric.name] = outcome.value
            if outcome.problem:
                missing = "no" if outcome.value is None else "still has its"
                logger.warning("custom metric %s: %s; %s %s for this evaluation", metric.label, outcome.problem,
                               missing, metric.name)
                self.failures.append(UserCodeFailure(metric.source, metric.name, metric.path, outcome.problem))
        return values
