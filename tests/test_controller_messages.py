"""Messages belong to a worker incarnation and a dispatch (issue 28): a late report of a dead worker is
logged and dropped, an illegal transition fails its run and not the experiment, a run whose chunks are all
durable completes whatever a late stop said, and a chunk's record merges the training metrics it logged."""

from __future__ import annotations

import copy

import pytest

from finetune.schedule.messages import ChunkDone, MetricsLogged, RunFailed
from finetune.schedule.records import RunStatus
from tests.test_controller import done, durable, make_controller, planned, send, status, ticket


def _dead_worker_replaced(tmp_path):
    controller, pool, _ = make_controller(tmp_path, [planned("a")])
    old = pool.workers[0]
    controller.step()
    first = ticket(controller, "a", 0)
    late = ChunkDone(old.worker_id, first, "a", 0, 1, {"eval_loss": 1.0}, 1.0, 0.8, 0.1, 100.0, 101.0, resident_runs=("a",))
    old.process.alive = False
    controller.step()  # the worker died: chunk 0 is lost once and retried on the replacement (same name)
    controller.step()
    replacement = pool.workers[0]
    assert replacement is not old and replacement.busy_with == "a" and ticket(controller, "a", 0) != first
    return controller, pool, replacement, late, first


def test_a_late_chunk_done_of_a_dead_worker_is_dropped_and_never_frees_its_replacement(tmp_path) -> None:
    controller, pool, replacement, late, _ = _dead_worker_replaced(tmp_path)
    send(controller, pool, late)  # on main: frees the replacement, dispatches again, RUNNING -> RUNNING aborts the run
    controller.step()
    assert replacement.busy_with == "a" and status(controller, "a") == "running"
    assert len(replacement.tasks.items) == 1, "the run is not dispatched a second time"
    stale = [event for event in controller.store.events() if event["kind"] == "stale_message"]
    assert stale and stale[0]["message"] == "ChunkDone" and stale[0]["ticket"] == late.ticket
    send(controller, pool, done(controller, replacement.worker_id, "a", 0), durable(controller, replacement.worker_id, "a", 0))
    assert controller.store.run("a").chunks_done == 1


def test_a_late_run_failed_of_a_dead_worker_is_dropped(tmp_path) -> None:
    controller, pool, replacement, late, first = _dead_worker_replaced(tmp_path)
    send(controller, pool, RunFailed(replacement.worker_id, "a", "RuntimeError: from the dead", "", first))
    assert status(controller, "a") == "running" and replacement.busy_with == "a"


def test_a_message_of_an_old_incarnation_is_dropped(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a")])
    worker = pool.workers[0]
    controller.step()
    worker.incarnation = 7  # the pool says which incarnation runs now
    message = done(controller, worker.worker_id, "a", 0)  # incarnation 0: of a process that is gone
    send(controller, pool, message)
    assert worker.busy_with == "a" and controller.runs["a"].trained_chunks == 0


def test_an_illegal_transition_fails_the_run_not_the_experiment(tmp_path, monkeypatch) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a"), planned("b")], slots=2)
    controller.step()

    def broken(message):  # a bug in handling one run's message
        controller.set_status(message.run_id, RunStatus.COMPLETED)  # running -> completed is not allowed

    monkeypatch.setattr(controller, "_chunk_done", broken)
    send(controller, pool, done(controller, pool.workers[0].worker_id, "a", 0))
    assert status(controller, "a") == "failed" and "running -> completed" in controller.store.run("a").error
    assert status(controller, "b") == "running", "the other run goes on"
    assert any(event["kind"] == "illegal_transition" for event in controller.store.events())


def test_a_stop_during_the_last_chunk_still_completes_the_run(tmp_path) -> None:
    controller, pool, tracker = make_controller(tmp_path, [planned("a", chunks=2)])
    worker = pool.workers[0].worker_id
    controller.step()
    send(controller, pool, done(controller, worker, "a", 0), durable(controller, worker, "a", 0))
    controller.step()
    controller.store.request("stop", "a")  # during the last chunk: applied at its boundary, before it is durable
    send(controller, pool, done(controller, worker, "a", 1))
    controller.step()
    assert status(controller, "a") == "stopped"
    send(controller, pool, durable(controller, worker, "a", 1))
    assert status(controller, "a") == "completed", "on main: stopped 2 of 2, and never finished"
    assert tracker.finished["mlflow-a"] == "FINISHED"
    assert controller.step() is False


def test_a_stopped_run_with_every_chunk_durable_is_completed_on_resume(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a", chunks=1)])
    controller.step()
    controller.store.set_state("a", "stopped", None)  # as main left it: stopped 1 of 1
    controller.store.record_chunk("a", 0, 1, str(tmp_path / "runs/a/chunk-0"), {"eval_loss": 1.0}, 1.0, 1.0, 0.0, 0.0, 1.0)
    controller.store.close()
    again, _, _ = make_controller(tmp_path, [planned("a", chunks=1)])
    assert status(again, "a") == "completed"


def grpo_run(run_id: str, chunks: int = 4):
    run = planned(run_id, chunks)
    return run.model_copy(update={"config": {**copy.deepcopy(run.config), "method": "grpo"}})


def test_a_chunk_record_merges_the_training_metrics_logged_during_the_chunk(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a")])
    worker = pool.workers[0].worker_id
    controller.step()
    now = ticket(controller, "a", 0)
    send(controller, pool, MetricsLogged(worker, "a", 1, {"loss": 2.0}, now))
    send(controller, pool, done(controller, worker, "a", 0), durable(controller, worker, "a", 0))
    row = controller.store.chunk_rows()[0]
    assert row["metrics"] == {"eval_loss": 1.0}, "SFT ranks by nothing it logs while training: only the evaluation"


@pytest.mark.parametrize("values, expected", [([1.0, 3.0], 2.0), ([1.0, float("nan")], "nan")])
def test_grpo_chunk_record_is_the_mean_reward_of_its_logging_steps(tmp_path, values, expected) -> None:
    from finetune.search.contract import merge_training

    merged = merge_training({}, [{"reward": value, "loss": 0.5} for value in values], lambda name: name == "reward")
    assert set(merged) == {"reward"}
    assert (merged["reward"] == expected) if expected != "nan" else merged["reward"] != merged["reward"]
