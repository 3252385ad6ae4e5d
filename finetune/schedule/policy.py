"""The scheduling policy: plain Python, no torch, testable alone.

Like a Ray Tune scheduler it sees results and answers: which (run, chunk) a free worker
takes next, and after each chunk's evaluation whether a run continues or stops
(asynchronous successive halving, with rungs counted in chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Decision = Literal["continue", "stop"]


@dataclass(frozen=True)
class RunView:
    """What the policy knows of a run."""

    run_id: str
    position: int
    chunks_done: int  # trained, durable or not
    total_chunks: int
    runnable: bool = True
    base_key: str = ""
    group: int = 0
    home: str | None = None  # the worker holding its state in memory
    durable: bool = True  # every trained chunk is on disk, so another worker can take it up


@dataclass(frozen=True)
class Task:
    run_id: str
    chunk: int


def next_task(runs: list[RunView], busy: set[str], worker: str, resident_keys: set[str]) -> Task | None:
    """What `worker` trains next: fewest chunks done first (fair turns); among equals a run already
    resident on this worker, then one whose base model it has loaded, then plan order.

    A run resident on another worker is taken over only once its chunks are durable there.
    """
    candidates = [
        run for run in runs
        if run.runnable and run.run_id not in busy and run.chunks_done < run.total_chunks
        and (run.home in (None, worker) or run.durable)
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda run: (run.chunks_done, run.home != worker, run.base_key not in resident_keys, run.position))
    return Task(best.run_id, best.chunks_done)


def slots_for(total_bytes: int, footprint_bytes: int, runnable: int, headroom: float = 0.9, most: int = 8) -> int:
    """How many runs one GPU trains at once (`runs_per_device: auto`): as many as fit by the
    footprint measured on the first chunk, at most one per runnable run and `most`."""
    if total_bytes <= 0 or footprint_bytes <= 0:
        return 1
    return max(1, min(most, runnable, int(total_bytes * headroom // footprint_bytes)))


@dataclass
class SuccessiveHalving:
    """Asynchronous successive halving over chunks (ASHA, Li et al. 2018).

    Rung k is reached after min_chunks * reduction_factor ** (k + min_early_stopping_rate) chunks.
    A run that reaches a rung continues only if its metric is in the top 1/reduction_factor of the
    runs that have reached that rung so far; at least one run always continues.
    """

    metric: str
    direction: Literal["minimize", "maximize"]
    min_chunks: int
    max_chunks: int
    reduction_factor: int = 2
    min_early_stopping_rate: int = 0
    rung_results: dict[int, dict[str, float]] = field(default_factory=dict)

    def rungs(self) -> list[int]:
        rungs = []
        k = self.min_early_stopping_rate
        while (milestone := self.min_chunks * self.reduction_factor**k) < self.max_chunks:
            rungs.append(milestone)
            k += 1
        return rungs

    def on_result(self, run_id: str, chunks_done: int, metrics: dict[str, float]) -> tuple[Decision, dict]:
        if chunks_done not in self.rungs() or self.metric not in metrics:
            return "continue", {}
        value = metrics[self.metric]
        rung = self.rung_results.setdefault(chunks_done, {})
        rung[run_id] = value
        ordered = sorted(rung.values(), reverse=self.direction == "maximize")
        keep = max(1, len(ordered) // self.reduction_factor)
        cutoff = ordered[keep - 1]
        good = value <= cutoff if self.direction == "minimize" else value >= cutoff
        detail = {"rung": chunks_done, "metric": self.metric, "value": value, "cutoff": cutoff, "seen": len(ordered)}
        return ("continue" if good else "stop"), detail
