"""Lineage of runs made from other runs (clones, population-based training): each run's ancestors."""

from __future__ import annotations


def lineages(parents: dict[str, str | None]) -> dict[str, list[str]]:
    """run_id -> its ancestors, the first planned one first, for every run with a parent (a parent that is
    not in `parents`, or a cycle in a damaged store, ends the chain)."""
    found = {}
    for run_id, parent in parents.items():
        chain: list[str] = []
        while parent is not None and parent not in chain and parent != run_id:
            chain.append(parent)
            parent = parents.get(parent)
        if chain:
            found[run_id] = chain[::-1]
    return found


def lineage_text(run_id: str, ancestors: list[str]) -> str:
    return " → ".join([*ancestors, run_id])
