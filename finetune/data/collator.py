"""Padding collator for tokenised SFT examples ({input_ids, labels})."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.data.pipeline import IGNORE_INDEX


@dataclass
class ChatCollator:
    """Pads to the longest example of the batch on `padding_side`.

    Inputs are padded with `input_pad_id` (EOS for unk-convert-to-eos, else the pad token);
    labels with -100, so padding never carries loss; the attention mask hides it.
    """

    input_pad_id: int
    padding_side: str = "right"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(example["input_ids"]) for example in examples)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for example in examples:
            ids = list(example["input_ids"])
            labels = list(example["labels"])
            gap = longest - len(ids)
            parts = {
                "input_ids": (ids, [self.input_pad_id] * gap),
                "labels": (labels, [IGNORE_INDEX] * gap),
                "attention_mask": ([1] * len(ids), [0] * gap),
            }
            for key, (values, padding) in parts.items():
                batch[key].append(padding + values if self.padding_side == "left" else values + padding)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
