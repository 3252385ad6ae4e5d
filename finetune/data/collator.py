"""Collators for tokenised SFT examples ({input_ids, labels}, and `seq_lengths` once packed).

`ChatCollator` pads a micro-batch to its longest example and masks the padding.
`PaddingFreeCollator` tells sequences apart by `position_ids` that restart at each: transformers
(5.x) builds a block-diagonal causal mask from the restarts (flash-attention runs them as
variable-length sequences), so no example attends to another, with or without packing.
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
    """Rows whose sequences are told apart by `position_ids` restarts, without an attention mask.

    `flatten` (for flash-attention's variable-length kernels): every sequence of the micro-batch in
    one row, so no token is padding. Otherwise (sdpa, eager, flex_attention, whose masked attention
    costs the square of a row's length): one row per example or packed row, the shorter rows ended
    by a padding segment of their own (positions restarting, no loss), which no real token attends
    to; packed rows are nearly full, so little is padding.

    Each sequence's first label becomes -100: the causal shift makes the token before it (the last
    of the previous sequence) predict it, a target that does not exist when the sequences are
    apart. A sequence's own first label is never a target anyway (nothing precedes it), so the
    loss and its token count equal those of the same sequences padded.
    """

    input_pad_id: int
    flatten: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [self._row(example) for example in examples]
        if self.flatten:
            rows = [tuple(sum((row[part] for row in rows), []) for part in range(3))]
        longest = max(len(ids) for ids, _, _ in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels, positions in rows:
            gap = longest - len(ids)
            batch["input_ids"].append(ids + [self.input_pad_id] * gap)
            batch["labels"].append(labels + [IGNORE_INDEX] * gap)
            batch["position_ids"].append(positions + list(range(gap)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    @staticmethod
    def _row(example: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
        ids = list(example["input_ids"])
        labels: list[int] = []
        positions: list[int] = []
        start = 0
        for length in segment_lengths(example):
            labels.append(IGNORE_INDEX)
            labels.extend(example["labels"][start + 1:start + length])
            positions.extend(range(length))
            start += length
        if start != len(ids):
            raise ValueError(f"a packed row's seq_lengths add up to {start}, its input_ids are {len(ids)} long")
        return ids, labels, positions
