"""A chunk's step progress, as a worker sees it: tokens trained and how fast, reported at most once a
second per run (the controller turns the reports into progress bars, or nothing outside a terminal)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

REPORT_SECONDS = 1.0


@dataclass(frozen=True)
class StepReport:
    """Where a run is within its chunk: `step` of `total_steps` (the run's), `chunk_end` the step its chunk
    ends at; `tokens` and `seconds` since the chunk began; device memory in bytes (0 on the CPU)."""

    run_id: str
    chunk: int
    step: int
    chunk_start: int
    chunk_end: int
    total_steps: int
    tokens: int
    seconds: float
    memory: int = 0
    total_memory: int = 0


def batch_tokens(batch: Any) -> int:
    """Tokens a micro-batch trains on: the attended positions (every position where nothing is padded,
    as in padding-free rows), over every sequence a method's batch holds (DPO: chosen and rejected);
    0 where the batch is not token ids (a GRPO batch of prompts before generation)."""
    if not isinstance(batch, dict):
        return 0
    masks = [value for key, value in batch.items() if key.endswith("attention_mask") and hasattr(value, "sum")]
    if masks:
        return int(sum(int(mask.sum()) for mask in masks))
    ids = [value for key, value in batch.items() if key.endswith("input_ids") and hasattr(value, "numel")]
    return int(sum(value.numel() for value in ids))


class StepMeter:
    """Counts a chunk's tokens at each optimizer step and reports (throttled: the first step, then at most
    once every `every` seconds) to `report`."""

    def __init__(self, report: Callable[[StepReport], None] | None, run_id: str, chunk: int, chunk_start: int,
                 chunk_end: int, total_steps: int, device: str, every: float = REPORT_SECONDS) -> None:
        self.report, self.run_id, self.chunk, self.chunk_end = report, run_id, chunk, chunk_end
        self.chunk_start = chunk_start
        self.total_steps, self.device, self.every = total_steps, device, every
        self.tokens = 0
        self.started = time.perf_counter()
        self.last_report = float("-inf")

    def __call__(self, step: int, batches: list[Any]) -> None:
        self.tokens += sum(batch_tokens(batch) for batch in batches)
        now = time.perf_counter()
        if self.report is None or (now - self.last_report < self.every and step < self.chunk_end):
            return
        self.last_report = now
        memory, total = device_memory(self.device)
        self.report(StepReport(self.run_id, self.chunk, step, self.chunk_start, self.chunk_end, self.total_steps, self.tokens,
                               now - self.started, memory, total))


def device_memory(device: str) -> tuple[int, int]:
    """(bytes allocated by this process on `device`, its total bytes); zeros on the CPU."""
    if not device.startswith("cuda"):
        return 0, 0
    import torch

    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.get_device_properties(device).total_memory)
