"""Population-based training alone, without training: who is replaced, by a clone of whom, with which knobs."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from conftest import BASE_SFT
from finetune.config.loading import parse_override
from finetune.config.scheduling import PopulationBasedSweep
from finetune.plan.derive import derive
from finetune.config.validation import CONFIG_ADAPTER
from finetune.plan.model import PlannedRun
from finetune.schedule.records import RunRecord, RunStatus
from finetune.search.contract import ChunkResult, CloneOf
from finetune.search.pbt import PopulationBasedTraining
from finetune.track.lineage import lineage_text, lineages

CHUNKS = 4
SCHEDULERS = ["linear", "cosine", "constant"]


def tree() -> dict[str, Any]:
    config = copy.deepcopy(BASE_SFT)
    config["training_args"]["learning_rate"] = {"$range": {"start": 1e-5, "end": 1e-2, "log": True}}
    config["training_args"]["lr_scheduler_type"] = {"$list": SCHEDULERS}
    config["peft_conf"]["peft_kwargs"]["r"] = {"$list": [4, 8]}
    return config


def pbt(**sweep: Any) -> PopulationBasedTraining:
    return PopulationBasedTraining(0, PopulationBasedSweep.model_validate({"strategy": "pbt", "num_runs": 4, **sweep}), tree())


def run(name: str, lr: float, durable: int = 1, chunks: int = CHUNKS, scheduler: str = "cosine", lineage_start: int = 0) -> RunRecord:
    config = copy.deepcopy(BASE_SFT)
    config["training_args"].update(learning_rate=lr, lr_scheduler_type=scheduler, max_steps=2 * chunks)
    config["experiment"]["num_chunks"] = chunks
    derived = derive(CONFIG_ADAPTER.validate_python(config), 100)
    planned = PlannedRun(run_id=name, label=name, knobs={}, config=config, derived=derived, lineage_start=lineage_start)
    return RunRecord(planned, None, "", "", RunStatus.PENDING, 0, durable, f"/ckpt/{name}" if durable else None, None, durable)


def report(search: PopulationBasedTraining, runs: list[RunRecord], values: dict[str, float], chunks_done: int = 1):
    verdicts = {}
    for record in runs:
        lineage = record.planned.lineage_start + chunks_done
        result = ChunkResult(record.run_id, chunks_done, lineage, chunks_done, {"eval_loss": values[record.run_id]})
        verdicts[record.run_id] = search.on_chunk(record, result, runs)
    return verdicts


def changes_of(clone: CloneOf) -> dict[str, Any]:
    return dict(((".".join(map(str, parse_override(change)[0]))), parse_override(change)[1]) for change in clone.changes)


def test_runs_are_judged_only_once_the_whole_population_has_a_value() -> None:
    runs = [run("d", 4e-3), run("a", 1e-3), run("b", 2e-3), run("c", 3e-3)]
    verdicts = report(pbt(), runs, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    assert not any(verdict.stop for verdict in verdicts.values()), "d was worst of the two that had reported"


def test_the_worst_run_stops_and_a_clone_continuing_the_best_replaces_it() -> None:
    search = pbt(resample_probability=0.0, perturbation_factors=[0.5, 2.0])
    runs = [run("a", 1e-3), run("b", 2e-3), run("c", 3e-3), run("d", 4e-3)]
    verdicts = report(search, runs, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    assert [name for name, verdict in verdicts.items() if verdict.stop] == ["d"]
    (clone,) = verdicts["d"].add
    assert clone.parent_run_id == "a" and clone.continues and not clone.warm_start and clone.reason == {"replaces": "d"}
    kind, detail = verdicts["d"].pending[0]  # logged once the clone is added
    assert kind == "pbt_exploit" and detail["parent"] == "a" and detail["value"] == 4.0 and detail["parent_value"] == 1.0
    changes = changes_of(clone)
    assert changes["training_args.learning_rate"] in (pytest.approx(5e-4), pytest.approx(2e-3))
    assert changes["training_args.lr_scheduler_type"] in ("linear", "constant")  # a neighbour of cosine
    assert not any(key.startswith("peft_conf") for key in changes), "the clone keeps the donor's adapter shape"
    assert set(changes) == {"training_args.learning_rate", "training_args.lr_scheduler_type"}, \
        "only the perturbed knobs change: the schedule, the data and the budget are the donor's (on main: a new schedule)"


def test_perturbed_values_stay_in_their_range_and_resampling_draws_afresh() -> None:
    search = pbt(resample_probability=0.0, perturbation_factors=[10.0])
    assert search._perturb(search.knobs[0][1], 5e-3) == pytest.approx(1e-2)  # 5e-2 kept at the range's end
    resampling = pbt(resample_probability=1.0, seed=1)
    drawn = {resampling._perturb(resampling.knobs[0][1], 1e-3) for _ in range(20)}
    assert len(drawn) == 20 and all(1e-5 <= value <= 1e-2 for value in drawn)
    assert search._perturb(search.knobs[1][1], "linear") == "cosine"  # the end of a list moves inwards


def test_nothing_happens_between_perturbation_points_at_the_last_chunk_or_without_a_durable_donor() -> None:
    runs = [run("a", 1e-3), run("b", 2e-3), run("c", 3e-3), run("d", 4e-3)]
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert not any(v.stop for v in report(pbt(perturbation_interval=2), runs, values, chunks_done=1).values())
    assert not any(v.stop for v in report(pbt(), runs, values, chunks_done=CHUNKS).values())
    undurable = [run("a", 1e-3, durable=0), *runs[1:]]
    verdicts = report(pbt(), undurable, values)
    assert not verdicts["d"].stop, "the best run has no durable chunk to start a clone from"
    assert not report(pbt(), runs[:1], {"a": 1.0})["a"].stop, "a population of one has nobody to learn from"


def test_a_clone_counts_its_chunks_from_where_its_parent_was() -> None:
    search = pbt(perturbation_interval=2)
    clone = run("clone", 1e-3, chunks=3, lineage_start=1)  # its parent had trained 1 of the lineage's 4 chunks
    assert [n for n in range(1, 4) if search.measures(clone, n)] == [1, 3], "measured where it is judged"
    runs = [run("a", 1e-3, durable=2), run("b", 2e-3, durable=2), run("c", 3e-3, durable=2), clone]
    verdicts = report(search, runs, {"a": 1.0, "b": 2.0, "c": 3.0, "clone": 4.0}, chunks_done=1)
    assert not verdicts["a"].stop and verdicts["clone"].stop  # lineage chunk 2 for the clone only


def test_a_higher_metric_is_better_when_maximized() -> None:
    runs = [run("d", 4e-3), run("c", 3e-3), run("b", 2e-3), run("a", 1e-3)]  # the worst reports last
    verdicts = report(pbt(direction="max"), runs, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    assert [name for name, verdict in verdicts.items() if verdict.stop] == ["a"]
    assert verdicts["a"].add[0].parent_run_id == "d"


def test_lineages_follow_parents_and_survive_a_cycle() -> None:
    chains = lineages({"a": None, "b": "a", "c": "b", "x": "y", "y": "x"})
    assert chains["c"] == ["a", "b"] and chains["b"] == ["a"] and "a" not in chains
    assert lineage_text("c", chains["c"]) == "a → b → c"
    assert chains["x"] == ["y"]


@pytest.mark.parametrize("bad", [{"quantile_fraction": 0.9}, {"perturbation_factors": []}, {"perturbation_factors": [0.0]},
                                 {"resample_probability": 1.5}, {"num_runs": 1}])
def test_bad_pbt_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PopulationBasedSweep.model_validate({"strategy": "pbt", "num_runs": 4, **bad})


class OneVerdict:
    """A searcher that answers every chunk with the same verdict."""

    group = 0

    def __init__(self, verdict) -> None:
        self.verdict, self.rejections = verdict, []

    def on_chunk(self, record, result, runs):
        return self.verdict

    def rejected(self, proposal, reason) -> None:
        self.rejections.append(reason)


class NoRuns:
    """A controller whose runs cannot be cloned (the parent is unknown)."""

    root = None
    runs: dict = {}

    def record(self, run_id):
        return None


def test_a_run_whose_replacement_is_rejected_goes_on() -> None:
    from finetune.schedule.search import SearchDriver
    from finetune.search.contract import Verdict

    record = run("d", 4e-3)
    result = ChunkResult("d", 1, 1, 1, {"eval_loss": 1.0})
    searcher = OneVerdict(Verdict(stop=True, add=[CloneOf("gone", (), True)], pending=[("pbt_exploit", {})]))
    stop, events = SearchDriver({0: searcher}).on_chunk(NoRuns(), record, result)
    assert not stop and [kind for _, kind, _ in events] == ["search_rejected"], "no exploit logged: it did not happen"
    assert searcher.rejections == ["no run gone"]
    searcher.verdict = Verdict(stop=True)
    assert SearchDriver({0: searcher}).on_chunk(NoRuns(), record, result) == (True, [])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_diverged_run_is_replaced_and_never_a_donor(bad) -> None:
    """On main: a NaN was skipped (the older score kept) and, while any run was NaN, nobody was exploited."""
    search = pbt(resample_probability=0.0)
    runs = [run("a", 1e-3), run("b", 2e-3), run("c", 3e-3), run("nan", 1e30)]
    verdicts = report(search, runs, {"a": 1.0, "b": 2.0, "c": 3.0, "nan": 0.5})  # first it looked best
    assert not verdicts["nan"].stop
    verdicts = report(search, [runs[3], *runs[:3]], {"a": 1.0, "b": 2.0, "c": 3.0, "nan": bad}, chunks_done=2)
    assert [name for name, verdict in verdicts.items() if verdict.stop] == ["nan"]
    assert verdicts["nan"].add[0].parent_run_id == "a"
    assert "diverged" in verdicts["nan"].pending[0][1]["reason"]
    donors = {verdict.add[0].parent_run_id for verdict in report(search, runs[::-1], {"a": 5.0, "b": 6.0, "c": 7.0, "nan": bad},
                                                                chunks_done=3).values() if verdict.add}
    assert "nan" not in donors


def test_explore_over_nested_knobs_gives_a_concrete_clone() -> None:
    """On main a clone of a `$list` of sub-configs with knobs was always rejected ("a clone is one run: no knobs")
    while a pbt_exploit decision was logged anyway."""
    from finetune.config.knobs import iter_knobs

    space = tree()
    space["training_args"]["optim_args"] = {"$list": [{"beta": {"$list": [0.1, 0.2]}}, {"beta": {"$list": [0.3, 0.4]}}]}
    search = PopulationBasedTraining(0, PopulationBasedSweep.model_validate({"strategy": "pbt", "num_runs": 4}), space)
    knob = next(knob for path, knob in search.knobs if path == ("training_args", "optim_args"))
    for _ in range(10):
        value = search._perturb(knob, {"beta": 0.1})
        assert not list(iter_knobs(value)) and value["beta"] in (0.1, 0.2, 0.3, 0.4)
