"""The Optuna searcher alone, without training: proposals, evidence of running runs, pruning, resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from conftest import BASE_SFT
from finetune.config.scheduling import OptunaSweep
from finetune.plan.model import Derived, PlannedRun
from finetune.schedule.records import RunRecord, RunStatus
from finetune.search.contract import ChunkResult, NewRun

pytest.importorskip("optuna")

from finetune.search.optuna_storage import StudyFile  # noqa: E402
from finetune.search.study import OptunaSearch, as_evidence, open_study  # noqa: E402


def result(run, chunks_done: int, metrics: dict) -> ChunkResult:
    return ChunkResult(run.run_id, chunks_done, chunks_done, chunks_done, metrics)


def study_of(path: Path, name: str, settings, chunks: int) -> tuple:
    file = StudyFile(path)
    return open_study(file, name, settings, chunks), file

BEST_LR = 1e-3
CHUNKS = 4


def tree() -> dict[str, Any]:
    config = copy.deepcopy(BASE_SFT)
    config["training_args"]["learning_rate"] = {"$range": {"start": 1e-6, "end": 1.0, "log": True}}
    config["peft_conf"]["peft_kwargs"]["r"] = {"$list": [4, 8]}
    return config


def searcher(tmp_path: Path, **sweep: Any) -> OptunaSearch:
    settings = OptunaSweep.model_validate({"strategy": "optuna", "num_runs": 40, "max_concurrent_runs": 1, "seed": 7, **sweep})
    study, file = study_of(tmp_path / "optuna.db", "study", settings, CHUNKS)
    return OptunaSearch(0, settings, tree(), study, CHUNKS, file)


def record(planned: PlannedRun, status: RunStatus = RunStatus.PENDING, trained: int = 0) -> RunRecord:
    derived = planned.derived.model_copy(update={"chunk_steps": [2] * CHUNKS})
    planned = planned.model_copy(update={"derived": derived})
    return RunRecord(planned, None, "", "", status, 0, trained, None, None, trained)


def loss(planned: PlannedRun) -> float:
    """A synthetic objective: best at BEST_LR, on a log scale."""
    return abs(math.log10(planned.knobs["training_args.learning_rate"] / BEST_LR))


def propose_one(search: OptunaSearch, runs: list[RunRecord]) -> RunRecord:
    proposals = search.propose(runs)
    assert proposals and isinstance(proposals[0], NewRun)
    run = record(proposals[0].planned)
    search.accepted(proposals[0], run.run_id)
    return run


def proposed_learning_rates(tmp_path: Path, sampler: str, count: int) -> list[float]:
    """Runs proposed one at a time; each reports its first chunk and keeps training (none ever finishes)."""
    search = searcher(tmp_path, sampler=sampler, startup_runs=4, max_concurrent_runs=1)
    runs = []
    for _ in range(count):
        run = propose_one(search, [])
        assert not search.on_chunk(run, result(run, 1, {"eval_loss": loss(run.planned)}), runs).stop  # median waits for finished trials
        runs.append(run)
    assert {trial.state.name for trial in search.study.trials} == {"RUNNING"}
    assert [run.planned.trial for run in runs] == list(range(count))
    return [math.log10(run.planned.knobs["training_args.learning_rate"]) for run in runs]


def test_proposals_use_the_chunk_metrics_of_runs_still_training(tmp_path) -> None:
    """No run ever finishes. A sampler that saw finished trials only would draw at random for ever; TPE,
    shown the running runs' chunk metrics, leaves the random draws (same seeds) after its startup runs and
    proposes learning rates nearer the best one."""
    (tmp_path / "tpe").mkdir(), (tmp_path / "random").mkdir()
    tpe = proposed_learning_rates(tmp_path / "tpe", "tpe", 24)
    uniform = proposed_learning_rates(tmp_path / "random", "random", 24)
    assert tpe[:4] == uniform[:4]  # the startup runs: random draws of the same seeds
    assert tpe[4:] != uniform[4:]

    def distance(values: list[float]) -> float:
        return sum(abs(value - math.log10(BEST_LR)) for value in values) / len(values)

    assert distance(tpe[12:]) < 0.75 * distance(uniform[12:]), (tpe, uniform)


def test_running_trials_are_shown_finished_so_far(tmp_path) -> None:
    search = searcher(tmp_path, max_concurrent_runs=2)
    run, fresh = (record(proposal.planned) for proposal in search.propose([]))
    search.accepted(NewRun(run.planned), run.run_id)
    search.on_chunk(run, result(run, 1, {"eval_loss": 2.0}), [run])
    search.on_chunk(run, result(run, 2, {"eval_loss": 1.5}), [run])
    trial = search.study.trials[run.planned.trial]
    shown = as_evidence(trial, running_as_pruned=True)
    assert shown.state.name == "PRUNED" and shown.intermediate_values == {1: 2.0, 2: 1.5}
    shown = as_evidence(trial, running_as_pruned=False)
    assert shown.state.name == "COMPLETE" and shown.value == 1.5
    untried = search.study.trials[fresh.planned.trial]  # no chunk yet: a constant liar's running trial, or nothing
    assert as_evidence(untried, running_as_pruned=True).state.name == "RUNNING"
    assert as_evidence(untried, running_as_pruned=False) is None


def test_the_study_proposes_up_to_its_slots_and_num_runs(tmp_path) -> None:
    search = searcher(tmp_path, num_runs=3, max_concurrent_runs=2)
    first = search.propose([])
    assert len(first) == 2
    runs = [record(proposal.planned) for proposal in first]
    for proposal, run in zip(first, runs):
        search.accepted(proposal, run.run_id)
    assert search.propose(runs) == []  # both slots taken
    runs[0].status = RunStatus.COMPLETED
    assert len(search.propose(runs)) == 1  # one slot free, one run left of num_runs
    runs.append(record(search.propose(runs)[0].planned))
    assert search.propose(runs) == []  # three runs: num_runs reached


def test_completed_pruned_and_deleted_runs_finish_their_trials(tmp_path) -> None:
    search = searcher(tmp_path, pruner="asha", reduction_factor=2)
    good, bad, gone = (propose_one(search, []) for _ in range(3))
    assert not search.on_chunk(good, result(good, 1, {"eval_loss": 1.0}), []).stop
    verdict = search.on_chunk(bad, result(bad, 1, {"eval_loss": 3.0}), [])
    assert verdict.stop and verdict.events[0][0] == "optuna_pruned"
    search.on_chunk(good, result(good, CHUNKS, {"eval_loss": 0.5}), [])
    good.status = RunStatus.COMPLETED
    search.on_status(good)
    gone.status = RunStatus.DELETED
    search.on_status(gone)
    states = {trial.number: (trial.state.name, trial.value) for trial in search.study.trials}
    assert states == {0: ("COMPLETE", 0.5), 1: ("PRUNED", 3.0), 2: ("FAIL", None)}  # pruned: its last value


def test_median_pruning_stops_a_run_worse_than_finished_ones(tmp_path) -> None:
    search = searcher(tmp_path, pruner="median", startup_runs=2)
    finished = [propose_one(search, []) for _ in range(2)]
    for run, value in zip(finished, (1.0, 1.2)):
        for chunk in range(1, CHUNKS + 1):
            search.on_chunk(run, result(run, chunk, {"eval_loss": value}), [])
        run.status = RunStatus.COMPLETED
        search.on_status(run)
    worse, better = propose_one(search, finished), propose_one(search, finished)
    assert search.on_chunk(worse, result(worse, 1, {"eval_loss": 5.0}), []).stop
    assert not search.on_chunk(better, result(better, 1, {"eval_loss": 0.9}), []).stop


def test_resume_maps_trials_to_runs_and_fails_a_trial_whose_run_never_joined(tmp_path) -> None:
    search = searcher(tmp_path)
    kept, done = propose_one(search, []), propose_one(search, [])
    search.propose([])[0]  # asked, then the controller was killed before its run joined the plan
    search.study.enqueue_trial({"training_args.learning_rate": 0.5})  # killed between enqueuing and asking
    search.on_chunk(done, result(done, CHUNKS, {"eval_loss": 0.7}), [])  # trained and durable; the controller died before `tell`
    done.status = RunStatus.COMPLETED
    again = searcher(tmp_path)
    rows = [{"run_id": done.run_id, "chunk": CHUNKS - 1, "metrics": {"eval_loss": 0.7}},
            {"run_id": kept.run_id, "chunk": 0, "metrics": {"eval_loss": 2.0}}]
    events = again.resume([kept, done], rows)
    assert [kind for kind, _ in events] == ["optuna_trial_abandoned"] * 2
    states = {trial.number: trial.state.name for trial in again.study.trials}
    assert states == {0: "RUNNING", 1: "COMPLETE", 2: "FAIL", 3: "FAIL"}
    assert again.study.trials[0].intermediate_values == {1: 2.0}
    assert again.study.trials[1].value == 0.7
    # Two runs of the study so far: the next proposals are trial 3 on, and nothing is asked twice.
    proposals = again.propose([done])
    assert [proposal.planned.trial for proposal in proposals] == [4]
    assert proposals[0].planned.knobs["training_args.learning_rate"] != 0.5, "not the values enqueued before the kill"


def test_a_duplicate_proposal_is_rejected_and_its_trial_failed(tmp_path) -> None:
    search = searcher(tmp_path)
    propose_one(search, [])
    proposal = search.propose([])[0]
    search.rejected(proposal, "an identical run exists")
    trial = search.study.trials[proposal.planned.trial]
    assert trial.state.name == "FAIL" and trial.user_attrs["rejected"] == "an identical run exists"


@pytest.mark.parametrize("sampler", ["random", "cmaes", "gp"])
def test_every_sampler_proposes_runs_within_the_knobs(tmp_path, sampler: str) -> None:
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    search = searcher(tmp_path, sampler=sampler, startup_runs=2)
    for _ in range(5):  # past the startup runs: the sampler's own model proposes the last ones
        run = propose_one(search, [])
        search.on_chunk(run, result(run, 1, {"eval_loss": loss(run.planned)}), [])
        assert 1e-6 <= run.planned.knobs["training_args.learning_rate"] <= 1.0
        assert run.planned.knobs["peft_conf.peft_kwargs.r"] in (4, 8)
    assert len({trial.params["training_args.learning_rate"] for trial in search.study.trials}) == 5


def test_a_small_space_is_proposed_without_duplicates_until_it_is_exhausted(tmp_path) -> None:
    settings = OptunaSweep.model_validate({"strategy": "optuna", "num_runs": 5, "max_concurrent_runs": 1, "startup_runs": 1})
    space = tree()
    space["training_args"]["learning_rate"] = {"$list": [1e-4, 1e-3]}  # with r: 4 distinct configs
    search = OptunaSearch(0, settings, space, *study_of(tmp_path / "optuna.db", "small", settings, CHUNKS)[:1], CHUNKS,
                          study_of(tmp_path / "optuna.db", "small", settings, CHUNKS)[1])
    runs: list[RunRecord] = []
    for _ in range(4):
        (proposal,) = search.propose(runs)
        run = record(proposal.planned, RunStatus.COMPLETED)
        search.accepted(proposal, run.run_id)
        search.on_chunk(run, result(run, CHUNKS, {"eval_loss": loss(run.planned)}), runs)
        search.on_status(run)
        runs.append(run)
    assert len({run.run_id for run in runs}) == 4
    assert search.propose(runs) == [], "every config of the space has a run"
    assert {trial.state.name for trial in search.study.trials} == {"COMPLETE"}, "no trial was asked for a duplicate"


@pytest.mark.parametrize("pruner", ["none", "median", "asha"])
def test_a_diverged_run_is_pruned_whatever_the_pruner_and_a_finite_one_is_not(tmp_path, pruner) -> None:
    """On main a NaN never pruned (median, none) or broke the asha rung for every later run."""
    search = searcher(tmp_path, pruner=pruner)
    diverged, healthy = propose_one(search, []), propose_one(search, [])
    verdict = search.on_chunk(diverged, result(diverged, 1, {"eval_loss": math.nan}), [])
    assert verdict.stop and "diverged" in verdict.events[0][1]["reason"]
    assert not search.on_chunk(healthy, result(healthy, 1, {"eval_loss": 1.0}), []).stop
    assert search.study.trials[0].state.name == "PRUNED"

