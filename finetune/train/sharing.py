"""How a worker's runs share what it has loaded, chosen once per worker.

`SharedBaseStrategy` (a one-device worker): runs of one base share its PeftModel, one named adapter
each; full fine-tunes and DPO runs get a private copy of the weights; many runs stay resident and
their state moves between GPU and CPU memory to fit the budgets.

`GangStrategy` (one rank of a gang): DDP and FSDP wrap one model with one set of trainable weights,
so the run takes the loaded base as its own (FSDP shards it once its trainer is built: `sharded`);
one run is resident at a time, alone on its devices; only rank 0 writes files.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Protocol

from finetune.train.bases import LoadedBase
from finetune.train.residency import Budgets, Resident, plan_placement
from finetune.train.session_cache import SessionCache


class SharingStrategy(Protocol):
    writes_files: bool
    freeze_bases: bool

    def make_model(self, base: LoadedBase, config: Any, run_id: str, seed: int, sessions: SessionCache) -> tuple[Any, str | None]:
        """The model the run trains and the name of its adapter (None: it trains whole weights)."""
        ...

    def make_room(self, sessions: SessionCache) -> list[str]:
        """Resident runs to close before a new session opens."""
        ...

    def placement(self, sessions: SessionCache, active: str, budgets: Budgets) -> tuple[list[str], list[str]]:
        """(runs to move to CPU memory, runs to drop to disk) before `active` trains."""
        ...


class SharedBaseStrategy:
    """Each opening of a run gets an adapter of its own name (`<run>_<n>`): a run that comes back to this
    worker after it trained elsewhere never meets its old adapter, which may have stayed on the shared
    model (PEFT keeps a model's last adapter); adapters of no open session are deleted here."""

    writes_files = True
    freeze_bases = True

    def __init__(self) -> None:
        self.openings = itertools.count()

    def make_model(self, base: LoadedBase, config: Any, run_id: str, seed: int, sessions: SessionCache) -> tuple[Any, str | None]:
        from finetune.train.adapter import attach_adapter, detach_adapter

        if config.peft_conf.peft_type == "NO_PEFT":
            return copy.deepcopy(base.model), None
        if config.method == "dpo":
            # TRL's DPO keeps its reference as an adapter copied from one named "default": a private model.
            return attach_adapter(copy.deepcopy(base.model), None, config.peft_conf, base.new_token_ids, "default", seed), "default"
        name = f"{run_id}_{next(self.openings)}"
        base.shared = attach_adapter(base.model, base.shared, config.peft_conf, base.new_token_ids, name, seed)
        in_use = {sessions[other].adapter_name for other in sessions.run_ids()} | {name}
        for leftover in [adapter for adapter in base.shared.peft_config if adapter not in in_use]:
            detach_adapter(base.shared, leftover)
        return base.shared, name

    def make_room(self, sessions: SessionCache) -> list[str]:
        return []

    def placement(self, sessions: SessionCache, active: str, budgets: Budgets) -> tuple[list[str], list[str]]:
        residents = [Resident(run_id, sessions[run_id].resident_bytes("cuda"), sessions[run_id].resident_bytes("cpu"))
                     for run_id in sessions.run_ids()]
        return plan_placement(residents, active, budgets)


class GangStrategy:
    freeze_bases = False

    def __init__(self, rank: int) -> None:
        self.writes_files = rank == 0

    def make_model(self, base: LoadedBase, config: Any, run_id: str, seed: int, sessions: SessionCache) -> tuple[Any, str | None]:
        from finetune.train.adapter import attach_adapter

        model, base.model = base.model, None
        if config.peft_conf.peft_type == "NO_PEFT":
            return model, None
        return attach_adapter(model, None, config.peft_conf, base.new_token_ids, "default", seed), "default"

    def make_room(self, sessions: SessionCache) -> list[str]:
        return list(sessions.run_ids())  # a gang's runs are large: one at a time in memory

    def placement(self, sessions: SessionCache, active: str, budgets: Budgets) -> tuple[list[str], list[str]]:
        return [], []  # alone on its devices
