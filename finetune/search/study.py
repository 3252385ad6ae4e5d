"""`sweep.strategy: optuna`: an Optuna study whose trials are the group's runs, one trial per run.

The study lives in `optuna.db` (SQLite) in the experiment folder. A trial is asked when a slot of the
study is free (`max_concurrent_runs`), its knob values become a run's config, and the run joins the plan
with its trial number (`PlannedRun.trial`, written atomically with plan.json): that mapping is what a
resume reads, so a trial whose run never joined the plan (the controller was killed between the two)
is failed rather than run again, and no run is proposed twice. Each chunk's metric is the trial's
intermediate value at step = chunks done; the pruner (or finetune's own ASHA) stops runs at chunk
boundaries; a completed run completes its trial with its last value.

Evidence of runs still training: the sampler never sees the study directly but a view of it, rebuilt
for each proposal, in which a running trial with intermediate values appears finished so far: as a
pruned trial at its latest step for TPE (which ranks pruned trials by how far they got, then by their
value there), as a completed trial of its latest value for the other samplers. Running trials without a
value yet are shown to TPE as running (its constant liar keeps proposals apart).

A NaN or infinite value (the run diverged) prunes the run once it may be pruned (`min_chunks`), whatever
the pruner, and the decision says so; such a run's trial fails. Every call below `Study`'s own methods
goes through `search.optuna_storage`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config.directions import diverged
from finetune.config.scheduling import OptunaSweep
from finetune.config.validation import validate_concrete
from finetune.plan.build import label_of, run_id_of
from finetune.plan.derive import DeriveError, derive
from finetune.plan.expand import Expansion, sample_with
from finetune.plan.model import PlannedRun, RunPlan
from finetune.search.contract import ChunkResult, Decision, NewRun, Proposal, RunInfo, Verdict, latest_metrics
from finetune.search.halving import SuccessiveHalving, replay_rungs
from finetune.search.optuna_storage import StudyFile
from finetune.search.study_heal import mismatch, rebuild, set_aside
from finetune.search.study_space import suggest_on

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)
OPTUNA_FILE = "optuna.db"
RUN_ATTR = "run_id"
MAX_REJECTIONS_IN_A_ROW = 20  # proposals refused one after another (bad configs): the study stops proposing
MAX_DRAWS = 50  # draws for a run unlike the existing ones before the space counts as exhausted


def open_study(file: StudyFile, name: str, sweep: OptunaSweep, num_chunks: int) -> optuna.Study:
    """The group's study in `file`, created on first use and loaded on resume."""
    import optuna

    return optuna.create_study(storage=file.storage, study_name=name, direction=sweep.direction or "minimize",
                               load_if_exists=True, sampler=optuna.samplers.RandomSampler(sweep.seed),
                               pruner=make_pruner(sweep, num_chunks))


def make_pruner(sweep: OptunaSweep, num_chunks: int) -> optuna.pruners.BasePruner:
    import optuna

    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup(), n_warmup_steps=sweep.min_chunks - 1)
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.min_chunks, reduction_factor=sweep.reduction_factor)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=sweep.min_chunks, max_resource=max(num_chunks, sweep.min_chunks),
                                              reduction_factor=sweep.reduction_factor)
    return optuna.pruners.NopPruner()  # none, and asha (decided by finetune's own policy)


def make_sampler(sweep: OptunaSweep, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    if sweep.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.startup(), constant_liar=True)
    if sweep.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=sweep.startup(), warn_independent_sampling=False)
    if sweep.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=sweep.startup())
    return optuna.samplers.RandomSampler(seed=seed)


def as_evidence(trial: optuna.trial.FrozenTrial, running_as_pruned: bool) -> optuna.trial.FrozenTrial | None:
    """How a trial of the study is shown to the sampler: finished ones as they are, a running one with
    intermediate values as finished so far (pruned at its latest step, or completed with its latest value)."""
    from optuna.trial import TrialState, create_trial

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return trial
    if trial.state is not TrialState.RUNNING:
        return None
    values = {step: value for step, value in trial.intermediate_values.items() if math.isfinite(value)}
    if not values:
        return trial if running_as_pruned else None
    common = {"params": trial.params, "distributions": trial.distributions, "user_attrs": trial.user_attrs,
              "system_attrs": trial.system_attrs, "intermediate_values": values}
    if running_as_pruned:
        return create_trial(state=TrialState.PRUNED, **common)
    return create_trial(state=TrialState.COMPLETE, value=values[max(values)], **common)


class OptunaSearch:
    """The searcher of one optuna group (see the module's docstring)."""

    def __init__(self, group: int, sweep: OptunaSweep, tree: dict[str, Any], study: optuna.Study, num_chunks: int,
                 file: StudyFile) -> None:
        self.group, self.sweep, self.tree, self.study, self.num_chunks = group, sweep, tree, study, num_chunks
        self.file = file
        self.direction = sweep.direction or "minimize"
        self.trial_of: dict[str, int] = {}  # run_id -> trial number
        self.latest: dict[str, float] = {}  # run_id -> its latest metric value
        self.rejections_in_a_row = 0
        self.asha = SuccessiveHalving(sweep.metric, self.direction, sweep.min_chunks, None, sweep.reduction_factor)
        self.damaged: str | None = None  # why optuna.db could not be read when it was opened

    @classmethod
    def open(cls, plan: RunPlan, group: int, root: Path) -> OptunaSearch:
        sweep = OptunaSweep.model_validate(plan.sweeps[group])
        tree = plan.search_spaces[group]
        num_chunks = int((tree.get("experiment") or {}).get("num_chunks", plan.num_chunks))
        name, path = f"{plan.experiment}-group{group}", root / OPTUNA_FILE
        damaged = None
        try:
            file = StudyFile(path)
            study = open_study(file, name, sweep, num_chunks)
            study.get_trials(deepcopy=False)
        except Exception as error:  # noqa: BLE001 - any damage to the cache: rebuilt from state.db on resume
            moved = set_aside(path)
            damaged = f"{OPTUNA_FILE} could not be read ({type(error).__name__}); set aside as {moved.name if moved else '-'}"
            file = StudyFile(path)
            study = open_study(file, name, sweep, num_chunks)
        search = cls(group, sweep, tree, study, num_chunks, file)
        search.damaged = damaged
        return search

    def measures(self, run: RunInfo, chunks_done: int) -> bool:
        return chunks_done >= self.sweep.min_chunks

    # ------------------------------------------------------------ resume

    def resume(self, runs: list[RunInfo], chunk_rows: list[dict[str, Any]]) -> list[Decision]:
        """Map trials to runs from the plan, fail the trials whose run never joined it, replay the durable
        chunks' values, and finish the trials of runs that ended while no controller watched."""
        from optuna.trial import TrialState

        mine = [run for run in runs if run.planned.group == self.group]
        self.trial_of = {run.run_id: run.planned.trial for run in mine if run.planned.trial is not None}
        events = self._heal(mine, chunk_rows)
        for _ in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.ask()  # enqueued, never asked (killed in between): taken now, failed below; never a later run's
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in self.trial_of.values():
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                events.append(("optuna_trial_abandoned", {"trial": trial.number, "reason": "its run never joined the plan"}))
        metrics = latest_metrics(chunk_rows)
        for run in mine:
            for chunks_done, values in sorted(metrics.get(run.run_id, {}).items()):
                if self.sweep.metric in values:
                    self._report(run.run_id, chunks_done, values[self.sweep.metric])
            self.on_status(run)
        if self.sweep.pruner == "asha":
            replay_rungs(self.asha, mine, chunk_rows)
        return events

    def _heal(self, mine: list[RunInfo], chunk_rows: list[dict[str, Any]]) -> list[Decision]:
        """Rebuild the study from state.db when it is damaged, missing or not the plan's (a one-line notice)."""
        import optuna

        problem = self.damaged or mismatch(self.study, mine)
        if problem is None:
            return []
        if self.study.get_trials(deepcopy=False):  # a study that is not the plan's: dropped, then rebuilt
            optuna.delete_study(study_name=self.study.study_name, storage=self.file.storage)
            self.study = open_study(self.file, self.study.study_name, self.sweep, self.num_chunks)
        count = rebuild(self.study, self.tree, self.sweep.metric, mine, chunk_rows)
        notice = f"rebuilt the Optuna study of group {self.group} from state.db ({count} trials): {problem}"
        logger.warning(notice)
        return [("optuna_rebuilt", {"group": self.group, "trials": count, "reason": problem})]

    # ------------------------------------------------------------ results

    def on_chunk(self, record: RunInfo, result: ChunkResult, runs: list[RunInfo]) -> Verdict:
        value = result.value(self.sweep.metric)
        chunks_done = result.chunks_done
        if value is None or record.run_id not in self.trial_of:
            return Verdict()
        self._report(record.run_id, chunks_done, value)
        if chunks_done >= record.total_chunks:
            return Verdict()
        detail: dict[str, Any] = {"trial": self.trial_of[record.run_id], "pruner": self.sweep.pruner, "chunks": chunks_done,
                                  "metric": self.sweep.metric, "value": value}
        if diverged(value) and chunks_done >= self.sweep.min_chunks:
            detail["reason"] = f"{self.sweep.metric} is {value}: the run diverged"
        elif not self._prune(record, chunks_done, result.metrics):
            return Verdict()
        from optuna.trial import TrialState

        self.study.tell(self.trial_of[record.run_id], state=TrialState.PRUNED, skip_if_finished=True)
        return Verdict(True, [("optuna_pruned", detail)])

    def _report(self, run_id: str, chunks_done: int, value: float) -> None:
        self.latest[run_id] = value
        number = self.trial_of[run_id]
        if self.file.state(self.study, number) == "RUNNING":  # a value after a resume replaces the one of the same step
            self.file.replace_value(self.study, number, chunks_done, value)

    def _prune(self, record: RunInfo, chunks_done: int, metrics: dict[str, float]) -> bool:
        if self.sweep.pruner == "none" or chunks_done < self.sweep.min_chunks:
            return False
        if self.sweep.pruner == "asha":
            return self.asha.on_result(record.run_id, chunks_done, record.total_chunks, metrics)[0] == "stop"
        return self.study.pruner.prune(self.study, self.file.frozen(self.study, self.trial_of[record.run_id]))

    def on_status(self, record: RunInfo) -> None:
        """A completed run completes its trial with its last value; a deleted one fails it. A run stopped by
        the user or failed keeps its trial running: `ctl resume` or `retry` may still finish it."""
        from optuna.trial import TrialState

        number = self.trial_of.get(record.run_id)
        if number is None:
            return
        if record.status == "completed":
            value = self.latest.get(record.run_id)
            finite = value is not None and math.isfinite(value)
            self.study.tell(number, value if finite else None, state=None if finite else TrialState.FAIL, skip_if_finished=True)
        elif record.status == "deleted":
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    # ------------------------------------------------------------ proposals

    def propose(self, runs: list[RunInfo]) -> list[Proposal]:
        """As many new runs as the study has free slots, up to num_runs in all. Only the study's own runs count:
        a run cloned by hand (`ctl clone`) from one of them is not a trial and takes neither a slot nor a run."""
        if self.rejections_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
            return []
        mine = [run for run in runs if run.planned.group == self.group and run.planned.trial is not None]
        room = min(self.sweep.max_concurrent_runs - sum(run.unfinished for run in mine), self.sweep.num_runs - len(mine))
        proposals: list[Proposal] = []
        existing = {run.run_id for run in runs}
        for _ in range(max(0, room)):
            planned = self.ask(existing)
            if planned is not None:
                proposals.append(NewRun(planned))
                existing.add(planned.run_id)
        return proposals

    def ask(self, existing: set[str]) -> PlannedRun | None:
        """A new trial and its run: the sampler picks the knob values on the study's view, the trial takes them.
        Where the sampler picks a run that exists (small discrete spaces), a random draw of the knobs is taken
        instead; None when MAX_DRAWS draws found nothing new (the space is exhausted)."""
        from optuna.trial import TrialState

        for attempt in range(MAX_DRAWS):
            chosen, expansion = self._sampled(random_draw=attempt > 0, attempt=attempt)
            if run_id_of(expansion.config) not in existing:
                break
        else:
            self.rejections_in_a_row = MAX_REJECTIONS_IN_A_ROW
            return None
        self.study.enqueue_trial(chosen.params)
        trial = self.study.ask()
        self.file.copy_system_attrs(self.study, trial.number, chosen.system_attrs)  # CMA-ES keeps its state in them
        expansion = sample_with(self.tree, suggest_on(trial, self.tree))
        planned, problem = self._planned(expansion, trial.number)
        if planned is None:
            trial.set_user_attr("rejected", problem)
            self.study.tell(trial, state=TrialState.FAIL)
            self.rejections_in_a_row += 1
            return None
        trial.set_user_attr(RUN_ATTR, planned.run_id)
        return planned

    def _sampled(self, random_draw: bool, attempt: int) -> tuple[optuna.trial.FrozenTrial, Expansion]:
        """Knob values from the sampler on the study's view (or a random draw), as a view trial and a config."""
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        seed = self.sweep.seed + len(trials) + attempt
        sampler = optuna.samplers.RandomSampler(seed) if random_draw else make_sampler(self.sweep, seed)
        view = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction=self.direction, sampler=sampler)
        for trial in [] if random_draw else trials:
            evidence = as_evidence(trial, running_as_pruned=self.sweep.sampler == "tpe")
            if evidence is not None:
                view.add_trial(evidence)
        expansion = sample_with(self.tree, suggest_on(view.ask(), self.tree))
        return view.get_trials(deepcopy=False)[-1], expansion

    def _planned(self, expansion: Expansion, number: int) -> tuple[PlannedRun | None, str]:
        config, issues = validate_concrete(expansion.config, lambda path: "the study's proposal")
        if config is None:
            return None, "; ".join(f"{issue.path}: {issue.message}" for issue in issues)
        try:
            derived = derive(config, None)  # from the run's own data once it is prepared
        except DeriveError as error:
            return None, str(error)
        return PlannedRun(run_id=run_id_of(expansion.config), label=f"trial {number}: {label_of(expansion)}", group=self.group,
                          knobs=expansion.knobs, config=expansion.config, derived=derived, trial=number), ""

    def accepted(self, proposal: Proposal, run_id: str) -> None:
        assert isinstance(proposal, NewRun) and proposal.planned.trial is not None
        self.trial_of[run_id] = proposal.planned.trial
        self.rejections_in_a_row = 0

    def rejected(self, proposal: Proposal, reason: str) -> None:
        from optuna.trial import TrialState

        assert isinstance(proposal, NewRun) and proposal.planned.trial is not None
        self.file.set_user_attr(self.study, proposal.planned.trial, "rejected", reason)
        self.study.tell(proposal.planned.trial, state=TrialState.FAIL, skip_if_finished=True)
        self.rejections_in_a_row += 1
