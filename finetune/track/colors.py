"""One colour per run, shared by the dashboard and the report's PNGs: a run has the same colour everywhere.

Colours follow the order in which runs joined the experiment (their position in the state store), so a
run keeps its colour while the ranking changes and when runs are added. Matplotlib's tab10, then its
tab20 light variants: 20 distinct colours before they repeat.
"""

from __future__ import annotations

from typing import Iterable

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)


def run_colors(run_ids_in_order: Iterable[str]) -> dict[str, str]:
    """run id -> colour, for the runs in the order they joined the experiment (`StateStore.runs()`)."""
    return {run_id: PALETTE[index % len(PALETTE)] for index, run_id in enumerate(run_ids_in_order)}
