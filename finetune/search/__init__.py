"""Search that decides as the experiment goes: successive halving (`halving`), an Optuna study (`study`) and
population-based training (`pbt`), each a `contract.Searcher`.

This package sits below `finetune.schedule`: the controller imports the searchers, and they see runs and
chunks only through `contract` (views and records of their own), never the controller's records, store or
control code. Nothing here imports torch; optuna is imported only by a study, when one is used.
"""

from __future__ import annotations

from pathlib import Path

from finetune.plan.model import RunPlan
from finetune.search.contract import Searcher
from finetune.search.halving import SuccessiveHalvingSearch, halving_of


def searchers_for(plan: RunPlan, root: Path) -> dict[int, Searcher]:
    """One searcher per group whose strategy searches, by group index."""
    found: dict[int, Searcher] = {}
    for group, sweep in enumerate(plan.sweeps):
        strategy = sweep.get("strategy")
        if strategy == "successive_halving":
            found[group] = SuccessiveHalvingSearch(group, halving_of(sweep))
        elif strategy == "optuna":
            from finetune.search.study import OptunaSearch

            found[group] = OptunaSearch.open(plan, group, root)
        elif strategy == "pbt":
            from finetune.search.pbt import PopulationBasedTraining

            found[group] = PopulationBasedTraining.of(plan, group)
    return found
