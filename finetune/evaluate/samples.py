"""The (prompt, reference answer) pairs that generation metrics are computed on.

They come from the run's validation records, read as the loss evaluation reads them (the same
files, the same automatic split): an SFT conversation's last assistant turn is the reference and
everything before it the prompt; a DPO record's prompt and its chosen answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class EvalSample:
    prompt: Messages
    reference: str


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
