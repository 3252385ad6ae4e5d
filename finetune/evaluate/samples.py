"""The (prompt, reference answer) pairs that generation metrics are computed on, and the answers kept.

They come from the run's validation records, read as the loss evaluation reads them (the same
files, the same automatic split): an SFT conversation's last assistant turn is the reference and
everything before it the prompt; a DPO record's prompt and its chosen answer.

Each evaluation that generates keeps its first `MAX_KEPT_ANSWERS` answers (`KeptAnswer`: prompt,
completion, reference, at the run's step) so that people can read what a run answers: they travel
with the chunk's report to the controller, which stores them in state.db's `samples` table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_KEPT_ANSWERS = 8

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class EvalSample:
    prompt: Messages
    reference: str


@dataclass(frozen=True)
class KeptAnswer:
    """One answer of an evaluation, kept to be read: `prompt` is the conversation before the answer
    (JSON messages), `position` the sample's place among the evaluation's prompts."""

    step: int
    position: int
    prompt: str
    completion: str
    reference: str

    @property
    def question(self) -> str:
        """The prompt's last turn (what a reader wants to see next to the answers)."""
        messages = json.loads(self.prompt)
        return str(messages[-1].get("content", "")) if messages else ""


def kept_answers(step: int, samples: list[EvalSample], completions: list[str], limit: int = MAX_KEPT_ANSWERS) -> tuple[KeptAnswer, ...]:
    return tuple(KeptAnswer(step, index, json.dumps(sample.prompt), completion, sample.reference)
                 for index, (sample, completion) in enumerate(zip(samples[:limit], completions[:limit])))


def sample_of(record: dict[str, Any], method: str) -> EvalSample | None:
    """The record's prompt and reference answer; None when it has no answer after a prompt."""
    if method == "dpo":
        prompt, answer = list(record["prompt_messages"]), _last_answer(record["chosen_messages"])
        return EvalSample(prompt, answer[1]) if prompt and answer is not None else None
    messages = record["messages"]
    answer = _last_answer(messages)
    if answer is None or answer[0] == 0:
        return None
    return EvalSample(list(messages[: answer[0]]), answer[1])


def _last_answer(messages: Messages) -> tuple[int, str] | None:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return index, str(messages[index].get("content", ""))
    return None


def eval_samples(config: Any, limit: int) -> list[EvalSample]:
    """At most `limit` samples from the validation records of `config`, in their order."""
    from finetune.data.pipeline import DataStats, gather_records

    _, records = gather_records(config.data_conf, config.method, DataStats())
    samples = []
    for record in records:
        sample = sample_of(record, config.method)
        if sample is not None:
            samples.append(sample)
        if len(samples) == limit:
            break
    return samples
