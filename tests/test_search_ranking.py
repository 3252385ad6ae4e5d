"""Ranking a user can trust (`search.ranking`): runs pruned early rank below runs that got further, final or
best value as `sweep.rank_by` says, ties and values of different chunks are said, a diverged run is last;
`experiment.keep: best` keeps the best chunk's checkpoint (at most two per run); `export EXP best`."""

from __future__ import annotations

import json
import math
import subprocess

from finetune.config.scheduling import ExperimentConfig
from finetune.plan.model import RunPlan
from finetune.schedule.controller import Controller
from finetune.schedule.messages import ChunkDone, ChunkDurable
from finetune.schedule.store import StateStore
from finetune.search.ranking import RankingRule, RunSummary, rank
from tests.test_controller import FakePool, FakeTracker, planned, ticket
from tests.test_training import FINETUNE

LOSS = RankingRule("eval_loss", "minimize")


def summary(run_id: str, values: dict[int, float], state: str = "completed", total: int = 4) -> RunSummary:
    done = max(values) if values else 0
    return RunSummary(run_id, state, done if state != "completed" else total, total, values)


def test_a_run_pruned_early_ranks_below_every_completed_run_and_says_so() -> None:
    """On main runs ranked by their latest value: a run pruned after chunk 1 of 4 ranked above completed runs."""
    standings = rank([summary("pruned", {1: 0.1}, state="stopped"), summary("done", {1: 2.0, 4: 1.0}),
                      summary("worse", {1: 2.0, 4: 1.5})], LOSS)
    assert [s.run_id for s in standings] == ["done", "worse", "pruned"]
    assert standings[2].note == "stopped at chunk 1 of 4"
    deeper = rank([summary("one", {1: 0.1}, state="stopped"), summary("two", {1: 0.5, 2: 0.9}, state="stopped")], LOSS)
    assert [s.run_id for s in deeper] == ["two", "one"], "among runs stopped early, the one that got further first"


def test_rank_by_final_or_best() -> None:
    runs = [summary("steady", {2: 0.6, 4: 0.6}), summary("overfit", {2: 0.2, 4: 0.9})]
    assert [s.run_id for s in rank(runs, LOSS)] == ["steady", "overfit"]
    best = rank(runs, RankingRule("eval_loss", "minimize", "best"))
    assert [s.run_id for s in best] == ["overfit", "steady"] and best[0].chunk == 2
    assert "measured at chunk 2" in best[0].note


def test_both_directions_and_a_diverged_run_last() -> None:
    runs = [summary("a", {4: 1.0}), summary("nan", {4: math.nan}), summary("b", {4: 2.0}), summary("inf", {4: math.inf})]
    assert [s.run_id for s in rank(runs, LOSS)][:2] == ["a", "b"]
    assert [s.run_id for s in rank(runs, RankingRule("rouge_l", "maximize"))][:2] == ["b", "a"]
    last = rank(runs, LOSS)[2:]
    assert {s.run_id for s in last} == {"nan", "inf"} and all("diverged" in s.note for s in last)


def test_ties_are_said() -> None:
    standings = rank([summary("a", {4: 1.0}), summary("b", {4: 1.0}), summary("c", {4: 2.0})], LOSS)
    assert standings[0].note == f"tie with {standings[1].run_id}" and standings[2].note == ""


def chunk_done(controller, worker, run_id, chunk, loss) -> ChunkDone:
    return ChunkDone(worker, ticket(controller, run_id, chunk), run_id, chunk, chunk + 1, {"eval_loss": loss}, 1.0, 0.8, 0.1,
                     100.0, 101.0, resident_runs=(run_id,))


def chunk_durable(controller, worker, run_id, chunk) -> ChunkDurable:
    path = controller.root / "runs" / run_id / f"chunk-{chunk}"
    path.mkdir(parents=True, exist_ok=True)
    final = controller.root / "runs" / run_id / "checkpoint-final"
    if chunk == controller.runs[run_id].total_chunks - 1:
        final.mkdir(parents=True, exist_ok=True)
        (final / "model.txt").write_text(run_id)
    return ChunkDurable(worker, ticket(controller, run_id, chunk), run_id, chunk, str(path), str(final) if final.is_dir() else None)


def run_to_the_end(tmp_path, losses: dict[str, list[float]], keep: str) -> Controller:
    runs = [planned(run_id, chunks=len(values)) for run_id, values in losses.items()]
    plan = RunPlan(experiment="t", output_dir=str(tmp_path), source="t.yaml", num_chunks=4, sweeps=[{"strategy": "grid"}],
                   runs=runs, settings=ExperimentConfig(name="t", keep=keep))
    pool = FakePool(1)
    controller = Controller(plan, tmp_path, StateStore(tmp_path / "state.db"), FakeTracker(), pool, poll_seconds=0,
                            prepare_run=lambda plan, root, run, devices: run)
    controller.start()
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    worker = pool.workers[0].worker_id
    while controller.step():
        busy = pool.workers[0].busy_with
        if busy:
            chunk = controller.runs[busy].trained_chunks
            pool.results.put(chunk_done(controller, worker, busy, chunk, losses[busy][chunk]))
            pool.results.put(chunk_durable(controller, worker, busy, chunk))
    return controller


def test_keep_best_keeps_the_best_chunk_and_the_last_and_nothing_else(tmp_path) -> None:
    controller = run_to_the_end(tmp_path, {"a": [1.0, 0.5, 0.8, 0.4, 0.9]}, keep="best")
    kept = sorted(path.name for path in (tmp_path / "runs" / "a").glob("chunk-*"))
    assert kept == ["chunk-3", "chunk-4"], "the best (0.4 after chunk 3) and the last; older bests removed"
    controller.store.close()


def test_keep_last_keeps_only_the_last(tmp_path) -> None:
    run_to_the_end(tmp_path, {"a": [1.0, 0.5, 0.8]}, keep="last").store.close()
    assert sorted(path.name for path in (tmp_path / "runs" / "a").glob("chunk-*")) == ["chunk-2"]


def test_export_best_exports_the_top_ranked_completed_run(tmp_path) -> None:
    run_to_the_end(tmp_path, {"a": [1.0, 0.9], "b": [1.0, 0.3], "c": [1.0, 0.6]}, keep="last").store.close()
    result = subprocess.run([*FINETUNE, "export", str(tmp_path), "best", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.txt").read_text() == "b" and "best run: b" in result.stderr
    report = subprocess.run([*FINETUNE, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report.md").read_text()
    assert text.index("`b`") < text.index("`c`") < text.index("`a`") and "Best run `b`" in text
    assert json.loads((tmp_path / "plan.json").read_text())["settings"]["keep"] == "last"
