"""Successive halving against fakes (no torch): rungs per run, both directions, ties, NaN and inf, groups
with their own chunk counts, and a restart that replays the rungs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from finetune.search.contract import ChunkResult
from finetune.search.halving import SuccessiveHalving, SuccessiveHalvingSearch, halving_of


@dataclass
class FakeRun:
    """A `search.contract.RunInfo`: what a searcher sees of a run."""

    run_id: str
    total_chunks: int = 8
    group: int = 0
    status: str = "pending"
    durable_chunks: int = 0
    last_checkpoint: str | None = None
    lineage_start: int = 0

    @property
    def planned(self):
        return self

    @property
    def active(self) -> bool:
        return self.status in ("pending", "running")

    @property
    def unfinished(self) -> bool:
        return self.active


def test_rungs_by_hand() -> None:
    assert SuccessiveHalving("m", "minimize", min_chunks=1, max_chunks=8).rungs(8) == [1, 2, 4]
    assert SuccessiveHalving("m", "minimize", min_chunks=1, max_chunks=9, reduction_factor=3).rungs(9) == [1, 3]
    assert SuccessiveHalving("m", "minimize", 1, 8, min_early_stopping_rate=1).rungs(8) == [2, 4]
    assert SuccessiveHalving("m", "minimize", 1, None).rungs(4) == [1, 2], "no max_chunks: the run's own chunk count"


def test_asha_keeps_the_top_fraction_at_each_rung() -> None:
    sha = SuccessiveHalving("eval_loss", "minimize", min_chunks=1, max_chunks=4)
    decisions = [sha.on_result(run, 1, 4, {"eval_loss": loss})[0] for run, loss in [("a", 3.0), ("b", 2.0), ("c", 4.0), ("d", 1.0)]]
    # a: alone -> continue; b: best of 2 -> continue; c: 3 seen, keep 1 -> stop; d: best of 4 -> continue
    assert decisions == ["continue", "continue", "stop", "continue"]
    decision, detail = sha.on_result("a", 2, 4, {"eval_loss": 1.5})
    assert decision == "continue" and detail["cutoff"] == 1.5 and detail["seen"] == 1
    assert sha.on_result("b", 2, 4, {"eval_loss": 1.7})[0] == "stop"
    assert sha.on_result("b", 3, 4, {"eval_loss": 9.0})[0] == "continue"  # not a rung


@pytest.mark.parametrize("direction, stopped", [("minimize", {"b", "c", "d"}), ("maximize", {"c"})])
def test_which_runs_are_stopped_follows_the_direction(direction, stopped) -> None:
    sha = SuccessiveHalving("m", direction, min_chunks=1, max_chunks=4)
    values = [("a", 1.0), ("b", 4.0), ("c", 2.0), ("d", 3.0)]
    assert {run for run, value in values if sha.on_result(run, 1, 4, {"m": value})[0] == "stop"} == stopped


def test_a_tie_at_the_cutoff_continues_both() -> None:
    sha = SuccessiveHalving("m", "minimize", min_chunks=1, max_chunks=4)
    assert [sha.on_result(run, 1, 4, {"m": 1.0})[0] for run in "abcd"] == ["continue"] * 4


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_diverged_value_is_stopped_and_never_breaks_the_rung(bad) -> None:
    """On main one NaN makes the cutoff NaN: every later run at the rung is stopped, the best included."""
    sha = SuccessiveHalving("m", "minimize", min_chunks=1, max_chunks=4)
    decision, detail = sha.on_result("nan", 1, 4, {"m": bad})
    assert decision == "stop" and "diverged" in detail["reason"]
    assert sha.on_result("best", 1, 4, {"m": 0.5})[0] == "continue"
    assert sha.on_result("worse", 1, 4, {"m": 0.9})[0] == "stop"
    assert sha.on_result("best2", 1, 4, {"m": 0.1})[0] == "continue"


def test_when_every_run_diverges_all_are_stopped_and_say_why() -> None:
    search = SuccessiveHalvingSearch(0, SuccessiveHalving("m", "minimize", 1, None))
    runs = [FakeRun(name, 4) for name in "abc"]
    verdicts = [search.on_chunk(run, ChunkResult(run.run_id, 1, 1, 1, {"m": math.nan}), runs) for run in runs]
    assert all(verdict.stop for verdict in verdicts)
    assert all(verdict.events[0][0] == "sha_stop" and "diverged" in verdict.events[0][1]["reason"] for verdict in verdicts)


def test_a_group_with_its_own_chunk_count_has_its_own_rungs() -> None:
    """On main the rungs came from group 0's num_chunks while the workers evaluated at the group's own."""
    search = SuccessiveHalvingSearch(1, halving_of({"strategy": "successive_halving", "metric": "m"}))
    short, long = FakeRun("short", total_chunks=2, group=1), FakeRun("long", total_chunks=8, group=1)
    assert [n for n in range(1, 9) if search.measures(short, n)] == [1]
    assert [n for n in range(1, 9) if search.measures(long, n)] == [1, 2, 4]
    assert not search.on_chunk(short, ChunkResult("short", 2, 2, 2, {"m": 9.0}), [short]).events, "its last chunk is no rung"


def test_resume_replays_the_rungs_of_durable_chunks() -> None:
    runs = [FakeRun("a", 4), FakeRun("b", 4), FakeRun("other", 4, group=1)]
    search = SuccessiveHalvingSearch(0, SuccessiveHalving("m", "minimize", 1, None))
    rows = [{"run_id": "a", "chunk": 0, "metrics": {"m": 1.0}}, {"run_id": "other", "chunk": 0, "metrics": {"m": 0.1}}]
    search.resume(runs, rows)
    assert search.policy.rung_results == {1: {"a": 1.0}}
    assert search.on_chunk(runs[1], ChunkResult("b", 1, 1, 1, {"m": 2.0}), runs).stop
