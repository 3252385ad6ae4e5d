"""Collators for tokenised SFT examples ({input_ids, labels}, and `seq_lengths` once packed).

`ChatCollator` pads a micro-batch to its longest example. `PaddingFreeCollator` puts the
micro-batch's examples end to end in one row with `position_ids` that restart at every
example: no token is padding, and transformers (5.x) builds a block-diagonal causal mask from
the restarts (flash-attention: variable-length kernels), so no example attends to another.
"""

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


def segment_lengths(example: dict[str, Any]) -> list[int]:
    """The lengths of the sequences in one row: one unless the row was packed."""
    return list(example.get("seq_lengths") or [len(example["input_ids"])])


@dataclass
class PaddingFreeCollator:
    """One row holding every sequence of the micro-batch, without padding or attention mask.

    Each sequence's first label becomes -100: the causal shift makes the token before it (the last
    of the previous sequence) predict it, a target that does not exist when the sequences are
    apart. A sequence's own first label is never a target anyway (nothing precedes it), so the
    loss and its token count equal those of the same sequences padded.
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for example in examples:
            input_ids.extend(example["input_ids"])
            start = 0
            for length in segment_lengths(example):
                labels.append(IGNORE_INDEX)
                labels.extend(example["labels"][start + 1:start + length])
                positions.extend(range(length))
                start += length
            if start != len(example["input_ids"]):
                raise ValueError(f"a packed row's seq_lengths add up to {start}, its input_ids are {len(example['input_ids'])} long")
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }
