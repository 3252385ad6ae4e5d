"""The controller alone, with a fake pool and tracker (no torch, no processes): message orders, lost
chunks and retries, interactive control, run state transitions, slots that train at once."""

from __future__ import annotations

import copy
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from finetune.plan.model import Derived, PlannedRun, RunPlan
from finetune.schedule.controller import Controller
from finetune.schedule.messages import ChunkDone, ChunkDurable, ChunkTask, MetricsLogged, RunFailed, WriteFailed
from finetune.schedule.pool import SlotPool, WorkerHandle
from finetune.schedule.records import IllegalTransition, RunStatus, check_transition
from finetune.schedule.store import StateStore
from tests.conftest import BASE_SFT


@dataclass
class FakeProcess:
    alive: bool = True
    exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.alive


@dataclass
class FakeTasks:
    items: list[ChunkTask] = field(default_factory=list)

    def put(self, task: ChunkTask) -> None:
        self.items.append(task)


class FakePool(SlotPool):
    """Workers on the CPU, `slots` of them; `respawn` replaces a dead one with a live one of its name."""

    def __init__(self, slots: int = 1) -> None:
        self.slots_setting, self.grown, self.devices = slots, set(), ["cpu"]
        self.results: queue.Queue = queue.Queue()
        self.workers = [self.spawn("cpu", slot) for slot in range(slots)]
        self.respawned: list[str] = []

    def spawn(self, device: str, slot: int, replacing: str | None = None) -> WorkerHandle:
        return WorkerHandle(replacing or f"{device}/{slot}", device, FakeProcess(), FakeTasks(), slot=slot)

    def respawn(self, worker: WorkerHandle) -> WorkerHandle:
        self.respawned.append(worker.worker_id)
        return super().respawn(worker)

    def local_devices(self) -> list[str] | None:
        return self.devices


class FakeTracker:
    uri = "memory://"

    def __init__(self) -> None:
        self.finished: dict[str, str] = {}
        self.logged: list[tuple[str, int]] = []

    def parent_run(self, known_id: str | None) -> str:
        return "parent"

    def child_run(self, parent_id: str, run: PlannedRun) -> str:
        return f"mlflow-{run.run_id}"

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        self.logged.append((run_id, step))

    def log_artifacts(self, run_id: str, directory: str) -> None:
        pass

    def finish(self, run_id: str, status: str) -> None:
        self.finished[run_id] = status

    def mirror(self, config: Any) -> None:
        return None

    def close(self) -> None:
        pass


def planned(run_id: str, chunks: int = 2, learning_rate: float = 1e-4) -> PlannedRun:
    config = copy.deepcopy(BASE_SFT)
    config["training_args"]["learning_rate"] = learning_rate
    derived = Derived(num_processes=1, total_train_batch_size=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      per_device_eval_batch_size=4, base_learning_rate=learning_rate, learning_rate=learning_rate,
                      num_train_epochs=1, train_examples=8 * chunks, steps_per_epoch=chunks, total_steps=chunks,
                      chunk_steps=[1] * chunks)
    return PlannedRun(run_id=run_id, label=run_id, knobs={}, config=config, derived=derived)


def make_controller(tmp_path: Path, runs: list[PlannedRun], slots: int = 1) -> tuple[Controller, FakePool, FakeTracker]:
    plan = RunPlan(experiment="t", output_dir=str(tmp_path), source="test.yaml", num_chunks=2, sweeps=[{"strategy": "grid"}], runs=runs)
    pool, tracker = FakePool(slots), FakeTracker()
    controller = Controller(plan, tmp_path, StateStore(tmp_path / "state.db"), tracker, pool, poll_seconds=0,
                            prepare_run=lambda plan, root, run, devices: run)  # no tokenizer or data here
    controller.start()
    return controller, pool, tracker


def ticket(controller: Controller, run_id: str, chunk: int) -> int:
    return controller.chunks[(run_id, chunk)].ticket


def done(controller: Controller, worker: str, run_id: str, chunk: int, resident: tuple[str, ...] = ()) -> ChunkDone:
    return ChunkDone(worker, ticket(controller, run_id, chunk), run_id, chunk, chunk + 1, {"eval_loss": 1.0 / (chunk + 1)}, 1.0, 0.8, 0.1, 100.0 + chunk, 101.0 + chunk,
                     resident_runs=resident or (run_id,), loaded_bases=("base",))


def durable(controller: Controller, worker: str, run_id: str, chunk: int) -> ChunkDurable:
    checkpoint = controller.root / "runs" / run_id / f"chunk-{chunk}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    return ChunkDurable(worker, ticket(controller, run_id, chunk), run_id, chunk, str(checkpoint), str(checkpoint) if chunk == 1 else None)


def send(controller: Controller, pool: FakePool, *messages: Any) -> None:
    for message in messages:
        pool.results.put(message)
    controller.step()


def status(controller: Controller, run_id: str) -> str:
    return controller.store.run(run_id).state


def test_done_before_durable_and_durable_before_done_record_the_same_chunks(tmp_path) -> None:
    for order in ("done-first", "durable-first"):
        root = tmp_path / order
        controller, pool, tracker = make_controller(root, [planned("a")])
        worker = pool.workers[0]
        for chunk in range(2):
            controller.step()
            assert worker.tasks.items[-1].chunk == chunk and status(controller, "a") == "running"
            messages = [done(controller, worker.worker_id, "a", chunk), durable(controller, worker.worker_id, "a", chunk)]
            send(controller, pool, *(messages if order == "done-first" else messages[::-1]))
        assert status(controller, "a") == "completed"
        assert [(row["chunk"], row["started_at"], row["trained_at"]) for row in controller.store.chunk_rows()] == [(0, 100.0, 101.0), (1, 101.0, 102.0)]
        assert not (root / "runs" / "a" / "chunk-0").exists(), "a superseded chunk checkpoint is deleted"
        assert tracker.finished["mlflow-a"] == "FINISHED"
        assert controller.step() is False


def test_a_chunk_lost_after_done_is_trained_again_and_its_late_durable_message_is_dropped(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a")])
    worker = pool.workers[0]
    controller.step()
    send(controller, pool, done(controller, worker.worker_id, "a", 0))  # trained, not yet durable
    assert controller.runs["a"].trained_chunks == 1
    lost_attempt = durable(controller, worker.worker_id, "a", 0)  # written while the worker dies
    worker.process.alive = False
    controller.step()  # the worker died with the chunk in memory only
    assert pool.respawned == [worker.worker_id]
    assert controller.runs["a"].trained_chunks == 0 and controller.runs["a"].home is None
    send(controller, pool, lost_attempt)  # chunk 0 is dispatched again, then the lost attempt's message arrives
    assert pool.workers[0].tasks.items[-1].chunk == 0, "chunk 0 is trained again on the new worker"
    assert controller.store.chunk_rows() == [] and controller.chunks[("a", 0)].status.value == "training"


def test_a_chunk_whose_worker_dies_is_retried_once_then_its_run_fails(tmp_path) -> None:
    controller, pool, tracker = make_controller(tmp_path, [planned("a")])
    controller.step()
    pool.workers[0].process.alive = False
    controller.step()
    assert status(controller, "a") == "pending"
    controller.step()
    assert pool.workers[0].tasks.items[-1].chunk == 0
    pool.workers[0].process.alive = False
    controller.step()
    assert status(controller, "a") == "failed" and "died" in controller.store.run("a").error
    kinds = [event["kind"] for event in controller.store.events()]
    assert kinds.count("chunk_lost") == 1 and kinds.count("run_failed") == 1
    assert tracker.finished["mlflow-a"] == "FAILED"
    assert controller.step() is False
    controller.store.request("retry", "a")  # the user retries it: the tries start afresh
    controller.step()
    assert status(controller, "a") == "running" and controller.chunks[("a", 0)].attempts == 1


def test_a_failed_write_fails_the_run_even_while_its_next_chunk_trains(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a", chunks=3)])
    worker = pool.workers[0]
    controller.step()
    send(controller, pool, done(controller, worker.worker_id, "a", 0))
    controller.step()
    assert worker.tasks.items[-1].chunk == 1
    in_flight = done(controller, worker.worker_id, "a", 1)
    send(controller, pool, WriteFailed(worker.worker_id, "a", 0, "OSError: disk full"))
    assert status(controller, "a") == "failed"
    send(controller, pool, in_flight)  # the chunk in flight comes back: ignored
    assert status(controller, "a") == "failed" and controller.store.chunk_rows() == []
    assert controller.step() is False


def test_two_slots_of_one_device_train_two_runs_at_once(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a"), planned("b", learning_rate=2e-4)], slots=2)
    controller.step()
    assert [worker.busy_with for worker in pool.workers] == ["a", "b"]
    assert {status(controller, run) for run in ("a", "b")} == {"running"}


def test_a_worker_reports_what_it_holds_and_an_evicted_run_may_move(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a"), planned("b", learning_rate=2e-4)])
    worker = pool.workers[0].worker_id
    controller.step()
    send(controller, pool, done(controller, worker, "a", 0, resident=("a",)), durable(controller, worker, "a", 0))
    assert controller.runs["a"].home == worker
    controller.step()
    assert pool.workers[0].busy_with == "b"
    send(controller, pool, done(controller, worker, "b", 0, resident=("b",)))  # it dropped "a" to make room
    assert controller.runs["a"].home is None and controller.runs["b"].home == worker


def test_stop_waits_for_the_chunk_boundary_and_resume_continues(tmp_path) -> None:
    controller, pool, tracker = make_controller(tmp_path, [planned("a")])
    worker = pool.workers[0].worker_id
    controller.step()
    request = controller.store.request("stop", "a")
    send(controller, pool, MetricsLogged(worker, "a", 1, {"loss": 2.0}))
    assert status(controller, "a") == "running", "applied at the chunk boundary, not in the middle of a chunk"
    send(controller, pool, done(controller, worker, "a", 0), durable(controller, worker, "a", 0))
    controller.step()
    assert status(controller, "a") == "stopped" and tracker.logged == [("mlflow-a", 1)]
    assert controller.step() is False, "nothing left to train while the only run is stopped"
    controller.store.request("stop", "a")
    controller.store.request("resume", "a")
    controller.step()
    requests = controller.store._db.execute("SELECT id, status FROM requests ORDER BY id").fetchall()
    assert requests[0] == (request, "applied") and requests[1][1].startswith("rejected: run a is stopped; stop acts on a pending or running run")
    assert requests[2][1] == "applied" and status(controller, "a") == "running"


def test_a_failed_run_is_retried_from_its_last_durable_chunk_and_resume_says_to_retry(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a")])
    worker = pool.workers[0].worker_id
    controller.step()
    send(controller, pool, RunFailed(worker, "a", "RuntimeError: boom", "", ticket(controller, "a", 0)))
    assert status(controller, "a") == "failed"
    resume = controller.store.request("resume", "a")
    controller.step()
    assert controller.store.request_status(resume) == (
        "rejected: run a is failed; resume acts on a stopped run; `retry` continues a failed run from its last durable chunk")
    controller.store.request("retry", "a")
    controller.step()
    assert status(controller, "a") == "running" and pool.workers[0].tasks.items[-1].chunk == 0


def test_a_clone_becomes_a_run_and_a_bad_one_is_rejected_with_its_reason(tmp_path) -> None:
    controller, pool, tracker = make_controller(tmp_path, [planned("a")])
    controller.store.request("clone", "a", {"set": ["training_args.learning_rate=5e-4"]})
    controller.store.request("clone", "a", {"set": ["batchsize_conf.total_train_batch_size=0"]})
    controller.step()
    statuses = [row[0] for row in controller.store._db.execute("SELECT status FROM requests ORDER BY id")]
    assert statuses[0].startswith("applied: new run") and statuses[1].startswith("rejected: batchsize_conf.total_train_batch_size")
    clone_id = statuses[0].rpartition(" ")[2]
    assert controller.runs[clone_id].planned.parent_run_id == "a"
    assert controller.store.run(clone_id).mlflow_run_id == f"mlflow-{clone_id}"


def test_unknown_messages_and_illegal_transitions_fail_loudly(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a")])
    pool.results.put({"type": "chunk_done"})
    with pytest.raises(TypeError, match="unknown worker message"):
        controller.step()
    with pytest.raises(IllegalTransition, match="completed -> running"):
        check_transition("a", RunStatus.COMPLETED, RunStatus.RUNNING)
    assert controller.runs["a"].status is RunStatus.RUNNING
    with pytest.raises(IllegalTransition, match="running -> completed"):
        controller.set_status("a", RunStatus.COMPLETED)
    assert status(controller, "a") == "running", "a refused transition changes nothing"


def test_a_stop_takes_effect_before_the_next_chunk_even_while_the_last_is_written(tmp_path) -> None:
    """The chunk is trained (not yet on disk) when the stop is seen: the run stops, no next chunk starts,
    and the resume sent after the stop is applied after it."""
    controller, pool, _ = make_controller(tmp_path, [planned("a", chunks=3)])
    worker = pool.workers[0]
    controller.step()
    controller.store.request("stop", "a")
    controller.store.request("resume", "a")
    controller.store.request("stop", "a")
    send(controller, pool, done(controller, worker.worker_id, "a", 0))  # trained; its checkpoint is still being written
    controller.step()
    assert [task.chunk for task in worker.tasks.items] == [0], "no chunk started after the stop"
    statuses = [row[0] for row in controller.store._db.execute("SELECT status FROM requests ORDER BY id")]
    assert statuses == ["applied", "applied", "applied"] and status(controller, "a") == "stopped"
    send(controller, pool, durable(controller, worker.worker_id, "a", 0))
    assert controller.store.run("a").chunks_done == 1 and status(controller, "a") == "stopped"


@pytest.mark.parametrize("change", ["experiment.name=other", "experiment.runs_per_device=4", "experiment={devices: cpu}"])
def test_a_clone_cannot_change_what_the_whole_experiment_shares(tmp_path, change) -> None:
    controller, _, _ = make_controller(tmp_path, [planned("a")])
    controller.store.request("clone", "a", {"set": [change]})
    controller.step()
    (answer,) = [row[0] for row in controller.store._db.execute("SELECT status FROM requests")]
    assert answer.startswith("rejected: experiment.") and "whole experiment" in answer
    assert list(controller.runs) == ["a"]


def test_a_warm_start_from_a_deleted_run_is_rejected_and_the_experiment_goes_on(tmp_path) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a"), planned("b", learning_rate=2e-4)])
    worker = pool.workers[0].worker_id
    controller.step()
    send(controller, pool, done(controller, worker, "a", 0), durable(controller, worker, "a", 0))
    controller.store.request("delete", "a")
    controller.store.request("clone", "a", {"set": [], "warm_start": True})
    controller.step()
    statuses = [row[0] for row in controller.store._db.execute("SELECT status FROM requests ORDER BY id")]
    assert statuses[0] == "applied" and statuses[1] == "rejected: warm start copies the parent's checkpoint; the parent is deleted"
    assert pool.workers[0].busy_with == "b"


def test_winding_down_dispatches_nothing_waits_for_the_chunk_in_training_and_ends(tmp_path) -> None:
    """Issue 31 (Ctrl-C): no new chunk once interrupted; the loop ends when the chunk being trained is durable."""
    from finetune.schedule.messages import StepProgress
    from finetune.train.progress import StepReport

    controller, pool, _ = make_controller(tmp_path, [planned("a"), planned("b")])
    worker = pool.workers[0]
    shown = []
    controller.on_progress = shown.append
    controller.step()
    assert [task.run.run_id for task in worker.tasks.items] == ["a"]
    send(controller, pool, StepProgress(worker.worker_id, StepReport("a", 0, 1, 0, 1, 2, tokens=10, seconds=0.5)))
    assert [progress.step for progress in shown] == [1]  # shown, never recorded:
    assert not any("progress" in event["kind"] for _, event in controller.store.events_after(0))
    controller.winding_down = True
    assert controller.step() is True  # the chunk of a is still being trained
    send(controller, pool, done(controller, worker.worker_id, "a", 0), durable(controller, worker.worker_id, "a", 0))
    assert controller.step() is False  # idle: the loop ends, b never started
    assert [task.run.run_id for task in worker.tasks.items] == ["a"]
    assert status(controller, "a") == "pending" and status(controller, "b") == "pending"
    assert controller.store.run("a").chunks_done == 1
    done_events = [event for _, event in controller.store.events_after(0) if event["kind"] == "chunk_done"]
    assert done_events and "tokens" in done_events[0]
