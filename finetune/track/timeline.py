"""When runs trained: the chunk intervals of `state.db`, and how much of the time runs overlapped."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def training_intervals(experiment: Path) -> list[tuple[float, float]]:
    """(started_at, trained_at) of every durable chunk whose worker recorded them, earliest first."""
    with sqlite3.connect(experiment / "state.db") as db:
        rows = db.execute("SELECT started_at, trained_at FROM chunks WHERE started_at IS NOT NULL ORDER BY started_at")
        return [(float(start), float(end)) for start, end in rows.fetchall()]


def seconds_with_at_least(intervals: list[tuple[float, float]], count: int) -> float:
    """Seconds during which at least `count` of the intervals were open at once."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    total, open_now, last = 0.0, 0, 0.0
    for at, change in edges:
        if open_now >= count:
            total += at - last
        open_now, last = open_now + change, at
    return total


def overlap_fraction(intervals: list[tuple[float, float]]) -> float:
    """The share of the time that anything trained during which two or more runs trained."""
    busy = seconds_with_at_least(intervals, 1)
    return seconds_with_at_least(intervals, 2) / busy if busy > 0 else 0.0
