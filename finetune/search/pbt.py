"""`sweep.strategy: pbt`: population-based training (Jaderberg et al. 2017) in chunks.

The population is the group's planned runs (a random sample). When a run reaches a perturbation point
(every `perturbation_interval` chunks of its lineage: a clone counts its parent's chunks, and is measured
exactly there), every run of the population has a value, and its metric is in the bottom
`quantile_fraction` of the population's latest values, it stops, and a clone of one of the top runs
replaces it (exploit): it continues that run's full durable state (adapter, optimizer moments, schedule
position, data position and RNG: its first chunks are the donor's, as Ray Tune's PBT resumes the donor's
checkpoint), with its knobs perturbed (explore): a `$range` knob multiplied by one of `perturbation_factors`
and kept in its range, a `$list` knob moved to a neighbouring value, either drawn afresh with
`resample_probability`. Knobs of the sections that shape the state or the schedule (`KEPT_SECTIONS`) are
kept: the clone trains the donor's adapter on the donor's schedule and data, so a lineage warms up once and
sees the data once per epoch. Its `parent_run_id` is the lineage, shown by `report` and the dashboard. The clone is added before the
worse run stops, so a controller killed between the two leaves one run too many, never one too few; a clone
that is rejected (an identical run exists, the donor's checkpoint cannot be copied) leaves the worse
run training, and then no exploit is logged.

A NaN or infinite value (the run diverged) ranks below every finite one: such a run is replaced at its next
perturbation point and is never a donor.
"""

from __future__ import annotations

import json
import random
from typing import Any

from finetune.config.directions import diverged, sort_key
from finetune.config.knobs import ListKnob, Path, iter_knobs, parse_knob
from finetune.config.scheduling import PopulationBasedSweep
from finetune.plan.expand import sample_with
from finetune.plan.model import RunPlan
from finetune.search.contract import ChunkResult, CloneOf, Decision, Proposal, RunInfo, Verdict, latest_metrics

# Kept by an exploit: the adapter's shape, the batches, the data, the model and the chunking are the donor's.
KEPT_SECTIONS = ("peft_conf", "batchsize_conf", "data_conf", "run_conf", "experiment", "quant_conf", "method")
KEPT_KEYS = (("training_args", "max_steps"), ("training_args", "num_train_epochs"))
MAX_DRAWS = 20  # perturbations tried for a clone unlike the ones already made


def value_at(tree: Any, path: Path) -> Any:
    for part in path:
        tree = tree[part]
    return tree


class PopulationBasedTraining:
    """The searcher of one pbt group (see the module's docstring)."""

    def __init__(self, group: int, sweep: PopulationBasedSweep, tree: dict[str, Any]) -> None:
        self.group, self.sweep, self.tree = group, sweep, tree
        self.direction = sweep.direction or "minimize"
        self.latest: dict[str, float] = {}  # run_id -> its latest metric value
        self.rng = random.Random(sweep.seed)
        self.made: set[tuple[str, tuple[str, ...]]] = set()  # (parent, changes) of the clones proposed so far
        self.knobs = [(path, parse_knob(plain)) for path, plain in iter_knobs(tree)
                      if path[0] not in KEPT_SECTIONS and tuple(path[:2]) not in KEPT_KEYS]

    @classmethod
    def of(cls, plan: RunPlan, group: int) -> PopulationBasedTraining:
        return cls(group, PopulationBasedSweep.model_validate(plan.sweeps[group]), plan.search_spaces[group])

    def measures(self, run: RunInfo, chunks_done: int) -> bool:
        return (run.planned.lineage_start + chunks_done) % self.sweep.perturbation_interval == 0

    def resume(self, runs: list[RunInfo], chunk_rows: list[dict[str, Any]]) -> list[Decision]:
        mine = {run.run_id for run in runs if run.planned.group == self.group}
        for run_id, by_chunk in latest_metrics(chunk_rows).items():
            values = [metrics[self.sweep.metric] for _, metrics in sorted(by_chunk.items()) if self.sweep.metric in metrics]
            if run_id in mine and values:
                self.latest[run_id] = values[-1]
        self.rng = random.Random(self.sweep.seed + len(chunk_rows))  # not the draws made before the restart
        return []

    def on_chunk(self, record: RunInfo, result: ChunkResult, runs: list[RunInfo]) -> Verdict:
        value = result.value(self.sweep.metric)
        if value is None:
            return Verdict()
        self.latest[record.run_id] = value
        progress = result.lineage_chunks
        if result.chunks_done >= record.total_chunks or progress % self.sweep.perturbation_interval:
            return Verdict()
        population = [run for run in runs if run.planned.group == self.group and run.active]
        ranked = self._ranked(population)
        count = max(1, int(len(ranked) * self.sweep.quantile_fraction))
        if len(ranked) < max(2, len(population)) or record.run_id not in {run.run_id for run in ranked[-count:]}:
            return Verdict()
        donors = [run for run in ranked[:count] if run.run_id != record.run_id and self._chunks_left(run) > 0
                  and not diverged(self.latest[run.run_id])]  # a diverged run is never a donor
        if not donors:
            return Verdict()
        parent = self.rng.choice(donors)
        detail = {"parent": parent.run_id, "value": value, "parent_value": self.latest[parent.run_id], "progress": progress,
                  "metric": self.sweep.metric}
        if diverged(value):
            detail["reason"] = f"{self.sweep.metric} is {value}: the run diverged"
        changes = self.explore(parent)
        for _ in range(MAX_DRAWS):  # another clone of the same chunk of the same parent would be the same run
            if (parent.run_id, tuple(changes)) not in self.made:
                break
            changes = self.explore(parent)
        self.made.add((parent.run_id, tuple(changes)))
        clone = CloneOf(parent.run_id, tuple(changes), continues=True, reason={"replaces": record.run_id})
        return Verdict(stop=True, add=[clone], pending=[("pbt_exploit", detail)])

    def _ranked(self, runs: list[RunInfo]) -> list[RunInfo]:
        """Best first, of the runs with a value (diverged ones last)."""
        scored = [run for run in runs if run.run_id in self.latest]
        return sorted(scored, key=lambda run: sort_key(self.latest[run.run_id], self.direction))

    def _chunks_left(self, run: RunInfo) -> int:
        return run.total_chunks - run.durable_chunks if run.last_checkpoint else 0

    def explore(self, parent: RunInfo) -> list[str]:
        """The clone's `--set` changes: its knobs perturbed (the rest is the parent's, state included)."""
        changes = []
        for path, knob in self.knobs:
            current = value_at(parent.planned.config, path)
            changes.append(f"{'.'.join(map(str, path))}={json.dumps(self._perturb(knob, current))}")  # --set's path form
        return changes

    def _perturb(self, knob: Any, current: Any) -> Any:
        resample = self.rng.random() < self.sweep.resample_probability
        if isinstance(knob, ListKnob):
            index = next((i for i, value in enumerate(knob.values) if value == current), None)
            if resample or index is None:  # a sub-config with knobs of its own never equals the parent's concrete one
                return self._concrete(knob.values[self.rng.randrange(len(knob.values))])
            step = self.rng.choice((-1, 1)) if 0 < index < len(knob.values) - 1 else (1 if index == 0 else -1)
            return self._concrete(knob.values[max(0, min(len(knob.values) - 1, index + step))])
        if resample:
            return knob.sample(self.rng.random())
        moved = current * self.rng.choice(self.sweep.perturbation_factors)
        return knob.cast(min(max(moved, knob.start), knob.end))

    def _concrete(self, value: Any) -> Any:
        """A candidate sub-config with knobs of its own, with those drawn (a clone is one run: no knobs)."""
        if not any(True for _ in iter_knobs(value)):
            return value

        def draw(_: str, knob: Any) -> Any:
            return self.rng.randrange(len(knob.values)) if isinstance(knob, ListKnob) else knob.sample(self.rng.random())

        return sample_with({"value": value}, draw).config["value"]

    def on_status(self, record: RunInfo) -> None:
        return None

    def propose(self, runs: list[RunInfo]) -> list[Proposal]:
        return []  # clones come with the verdict that stops the run they replace

    def accepted(self, proposal: Proposal, run_id: str) -> None:
        return None

    def rejected(self, proposal: Proposal, reason: str) -> None:
        return None
