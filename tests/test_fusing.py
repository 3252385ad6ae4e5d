"""Which runs fuse (finetune.schedule.fusing) and fused experiments end to end."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from finetune.schedule.fusing import FuseView, fuse_groups, fuse_key, group_limit
from finetune.schedule.policy import Task
from tests.helpers import issues_of, state_db


def _view(run_id: str, key: str = "k", rows: int = 8, done: int = 0, position: int = 0, **kwargs: Any) -> FuseView:
    return FuseView(run_id, key, rows, done, position, **kwargs)


def _groups(assignments: list[tuple[str, str]], views: list[FuseView], setting: Any, busy: set[str] | None = None) -> list:
    tasks = [(worker, Task(run_id, 0)) for worker, run_id in assignments]
    groups = fuse_groups(tasks, views, busy or set(), setting, lambda view: Task(view.run_id, view.chunks_done))
    return [(worker, [task.run_id for task in group]) for worker, group in groups]


def test_a_leader_takes_riders_of_its_fuse_key_fairest_first_up_to_k() -> None:
    views = [_view("a", position=0), _view("b", done=1, position=1), _view("c", position=2), _view("d", key="other", position=3),
             _view("e", key="", position=4), _view("f", position=5)]
    assert _groups([("w0", "a")], views, 3) == [("w0", ["a", "c", "f"])]  # b has more chunks done: after c and f
    assert _groups([("w0", "a")], views, 8) == [("w0", ["a", "c", "f", "b"])]  # never d (another base) nor e (cannot fuse)
    assert _groups([("w0", "a")], views, "off") == [("w0", ["a"])]
    assert _groups([("w0", "e")], views, 8) == [("w0", ["e"])]  # a leader that cannot fuse trains alone


def test_riders_are_neither_busy_nor_assigned_elsewhere_nor_held_by_another_worker() -> None:
    views = [_view("a"), _view("b", position=1), _view("c", position=2, home="w9", durable=False), _view("d", position=3),
             _view("e", position=4, home="w0", durable=False)]
    groups = _groups([("w0", "a"), ("w1", "d")], views, 8, busy={"b"})
    assert groups == [("w0", ["a", "e"]), ("w1", ["d"])]  # c's state is only in w9's memory; e's is in w0's


def test_auto_fills_a_row_budget() -> None:
    most, rows = group_limit("auto")
    views = [_view(f"r{i}", rows=24, position=i) for i in range(5)]
    assert _groups([("w0", "r0")], views, "auto") == [("w0", ["r0", "r1"])]  # 72 rows would pass the budget of 64
    assert rows == 64 and most >= 8 and group_limit(4) == (4, 0) and group_limit("off")[0] == 1


def test_the_config_decides_who_may_fuse(base_config) -> None:
    from finetune.config.models import CONFIG_ADAPTER

    def key(**changes: Any) -> str:
        tree = copy.deepcopy(base_config)
        tree["experiment"]["fuse"] = changes.pop("fuse", 4)
        for section, values in changes.items():
            tree[section] = values if section == "peft_conf" else {**tree.get(section, {}), **values}
        return fuse_key(CONFIG_ADAPTER.validate_python(tree), "base", "")

    assert key() == "sft|base"
    assert key(fuse="off") == ""
    assert key(peft_conf={"peft_type": "NO_PEFT"}) == ""
    assert key(peft_conf={"peft_type": "LORA", "peft_kwargs": {"r": 4, "use_dora": True}}) == ""
    assert key(peft_conf={"peft_type": "LORA", "peft_kwargs": {"r": 4, "lora_bias": True}}) == ""
    assert key(peft_conf={"peft_type": "LORA", "peft_kwargs": {"r": 4, "lora_bias": False}}) == "sft|base"
    assert key(training_args={"learning_rate": 1e-4, "fp16": True}) == ""


@pytest.mark.parametrize("value", [1, 0, "sometimes", 65])
def test_a_bad_fuse_setting_is_refused_with_its_path(base_config, value) -> None:
    tree = copy.deepcopy(base_config)
    tree["experiment"]["fuse"] = value
    issues = issues_of(tree)
    assert issues and any("experiment.fuse" in str(issue) for issue in issues), issues


def test_fuse_is_one_setting_for_the_whole_experiment(base_config) -> None:
    tree = copy.deepcopy(base_config)
    tree["groups"] = [{"experiment": {"fuse": 2}}]
    assert issues_of(tree)


@pytest.mark.slow
def test_a_fused_sweep_killed_mid_group_resumes_to_the_same_adapters_as_the_sweep_by_turns(tmp_path, demo_dir) -> None:
    """The demo grid (4 runs) with fuse 4, its controller SIGKILLed once the first group's chunks are
    durable, then resumed; and the same grid with fuse off, one worker of one thread both. The fused
    groups are in the decision log, and every run's final adapter is that of the sweep by turns within the
    fused products' bound (tests/test_fused.py): a relative 1e-3 per tensor after 8 steps (7e-5 measured;
    a chunk trained twice or lost by the resume is off by far more)."""
    import os
    import signal

    from tests.test_training import _adapters, _wait_for_chunks, chunk_rows, demo_config, finetune, small, start_experiment, states

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "fused")
    common = ["--set", "experiment.threads_per_worker=1", "--set", "experiment.devices=cpu",
              # a template whose tokens the demo tokenizer has: no new token rows (those do not fuse)
              "--set", "data_conf.chat_template_name=mistral-with-system"]
    process = start_experiment(tmp_path, ["run", str(config), *small("fused", steps=8, chunks=4), *common, "--set", "experiment.fuse=4"])
    fused = tmp_path / "runs" / "fused"
    _wait_for_chunks(fused, 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 4 <= len(chunk_rows(fused)) < 16
    finetune(tmp_path, "run", "--resume", str(fused))
    finetune(tmp_path, "run", str(config), *small("turns", steps=8, chunks=4), *common)
    turns = tmp_path / "runs" / "turns"
    assert set(states(fused).values()) == {"completed"} and len(states(fused)) == 4
    assert len(chunk_rows(fused)) == 16
    with state_db(fused) as db:
        groups = [json.loads(row[0]) for row in db.execute("SELECT detail FROM events WHERE kind = 'fused_group'").fetchall()]
        done = [json.loads(row[0]) for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_done'").fetchall()]
    assert len(groups) >= 4 and all(len(set(group["runs"])) == 4 for group in groups)
    assert done and all(event["tokens"] > 0 for event in done), "each member's chunk counts the tokens it trained"
    with state_db(turns) as db:
        assert not db.execute("SELECT count(*) FROM events WHERE kind = 'fused_group'").fetchone()[0]
    by_turns, fused_adapters = _adapters(turns, tensors=True), _adapters(fused, tensors=True)
    assert by_turns.keys() == fused_adapters.keys() and len(by_turns) == 4
    for label, tensors in by_turns.items():
        ratios = {key: float((fused_adapters[label][key] - value).norm() / value.norm()) for key, value in tensors.items()}
        assert max(ratios.values()) < 1e-3, (label, ratios)


# ---------------------------------------------------------------- the controller with fused groups (no torch)

def _fused_controller(tmp_path, run_ids: list[str], fuse: Any = 4, chunks: int = 2) -> tuple[Any, Any]:
    from tests.test_controller import make_controller, planned

    runs = [planned(run_id, chunks=chunks, learning_rate=1e-4 * (index + 1)) for index, run_id in enumerate(run_ids)]
    for run in runs:
        run.config["experiment"]["fuse"] = fuse
    controller, pool, _ = make_controller(tmp_path, runs)
    return controller, pool


def _last_group(pool: Any) -> list[tuple[str, int]]:
    from finetune.schedule.messages import FusedTask

    task = pool.workers[0].tasks.items[-1]
    tasks = task.tasks if isinstance(task, FusedTask) else (task,)
    return [(chunk_task.run.run_id, chunk_task.chunk) for chunk_task in tasks]


def _finish(controller: Any, pool: Any, run_id: str, chunk: int) -> None:
    from tests.test_controller import done, durable, send

    worker = pool.workers[0].worker_id
    send(controller, pool, done(controller, worker, run_id, chunk), durable(controller, worker, run_id, chunk))


def test_compatible_runs_train_as_one_group_whose_members_report_alone(tmp_path) -> None:
    controller, pool = _fused_controller(tmp_path, ["a", "b", "c"], fuse=2)
    controller.step()
    assert _last_group(pool) == [("a", 0), ("b", 0)]  # fuse 2: at most two runs in a group; c waits for a worker
    tickets = {run: controller.chunks[(run, 0)].ticket for run in "ab"}
    assert len(set(tickets.values())) == 2  # each member has its own chunk and ticket
    events = [event for event in controller.store.events() if event["kind"] == "fused_group"]
    assert events == [{**events[0], "runs": ["a", "b"], "chunks": [0, 0]}]
    assert controller.training("a") and controller.training("b") and not controller.training("c")
    _finish(controller, pool, "a", 0)
    assert controller.training("b") and len(pool.workers[0].tasks.items) == 1  # the worker is busy until b is done too
    _finish(controller, pool, "b", 0)
    controller.step()
    assert _last_group(pool) == [("c", 0), ("a", 1)]  # fewest chunks first: c leads, a rides


def test_every_member_of_a_group_shows_its_step_progress(tmp_path) -> None:
    """A worker sends progress for each member it trains at once: the riders' is shown, not only the leader's."""
    from finetune.schedule.messages import StepProgress
    from finetune.train.progress import StepReport
    from tests.test_controller import send

    controller, pool = _fused_controller(tmp_path, ["a", "b", "c"], fuse=2)
    shown: list[str] = []
    controller.on_progress = lambda report: shown.append(report.run_id)
    controller.step()
    assert _last_group(pool) == [("a", 0), ("b", 0)]
    worker = pool.workers[0].worker_id
    send(controller, pool, *[StepProgress(worker, StepReport(run, 0, 1, 0, 1, 2, tokens=10, seconds=0.5)) for run in "abc"])
    assert shown == ["a", "b"]  # c is not being trained by that worker: dropped


def test_a_member_stopped_mid_group_leaves_it_at_the_boundary_and_a_clone_joins(tmp_path) -> None:
    controller, pool = _fused_controller(tmp_path, ["a", "b", "c"], fuse=4)
    controller.step()
    assert _last_group(pool) == [("a", 0), ("b", 0), ("c", 0)]
    controller.store.request("stop", "b")
    controller.store.request("clone", "a", {"set": ["training_args.learning_rate=5e-4"]})
    controller.step()
    assert controller.store.run("b").state == "running", "a stop waits for the member's chunk boundary"
    clone = next(run_id for run_id in controller.runs if run_id not in "abc")
    assert not controller.training(clone)  # the group in flight is not changed
    for run_id in "abc":
        _finish(controller, pool, run_id, 0)
    controller.step()
    assert controller.store.run("b").state == "stopped"
    assert _last_group(pool) == [(clone, 0), ("a", 1), ("c", 1)]  # b left the group; the clone joined it


def test_a_worker_lost_mid_group_loses_every_members_chunk_and_they_are_retried(tmp_path) -> None:
    controller, pool = _fused_controller(tmp_path, ["a", "b"])
    controller.step()
    _finish(controller, pool, "a", 0)  # a's chunk is durable; b's was still in flight
    pool.workers[0].process.alive = False
    controller.step()
    assert controller.store.run("b").state == "pending"
    assert [event["run_id"] for event in controller.store.events() if event["kind"] == "chunk_lost"] == ["b"]
    controller.step()
    assert _last_group(pool) == [("b", 0), ("a", 1)] and controller.chunks[("b", 0)].attempts == 2


def test_a_member_that_fails_fails_alone_and_the_group_goes_on(tmp_path) -> None:
    from finetune.schedule.messages import RunFailed
    from tests.test_controller import send, ticket

    controller, pool = _fused_controller(tmp_path, ["a", "b"])
    controller.step()
    worker = pool.workers[0].worker_id
    send(controller, pool, RunFailed(worker, "b", "ValueError: its evaluation failed", "", ticket(controller, "a", 0)))
    assert controller.store.run("b").state == "running"  # a report naming another member's ticket is stale: dropped
    send(controller, pool, RunFailed(worker, "b", "ValueError: its evaluation failed", "", ticket(controller, "b", 0)))
    assert controller.store.run("b").state == "failed" and controller.training("a")
    assert len(pool.workers[0].tasks.items) == 1  # a's chunk is still in flight: nothing more for the worker
    _finish(controller, pool, "a", 0)
    controller.step()
    assert _last_group(pool) == [("a", 1)]


@pytest.mark.slow
def test_a_worker_trains_a_group_that_cannot_fuse_one_run_after_another_and_says_why(tmp_path, demo_dir, caplog) -> None:
    """chat-ml adds two tokens to the demo tokenizer, so each run trains its own rows of them: the worker's
    bench trains the group's chunks one after another, warns once, and each member's chunk is done."""
    import logging

    from finetune.config.loading import load_document
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.plan.build import build_plan
    from finetune.train.residency import Budgets
    from finetune.train.workbench import FusedMember, Workbench
    from tests.test_training import demo_config

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "refused")
    runs = build_plan(load_document(config, overrides=["training_args.max_steps=2", "experiment.num_chunks=2",
                                                       "experiment.fuse=2"])).runs[:2]
    (tmp_path / "exp").mkdir(exist_ok=True)
    bench = Workbench(tmp_path / "exp", "cpu", Budgets(0, 1 << 40))
    members = [FusedMember(run, CONFIG_ADAPTER.validate_python(run.config), 0, None, 8, evaluate=False) for run in runs]
    with caplog.at_level(logging.WARNING, logger="finetune.train.workbench"):
        outcomes = bench.train_fused(members)
        bench.train_fused([FusedMember(m.run, m.config, 1, outcome.checkpoint, 8, False) for m, outcome in zip(members, outcomes)])
    bench.writer.close()
    assert [(outcome.run_id, outcome.chunk, outcome.global_step) for outcome in outcomes] == [(run.run_id, 0, 1) for run in runs]
    warnings = [record.message for record in caplog.records if "experiment.fuse" in record.message]
    assert len(warnings) == 1 and "token rows (trainable_token_indices)" in warnings[0]
    assert all((tmp_path / "exp" / "runs" / run.run_id / "checkpoint-final").is_dir() for run in runs)
