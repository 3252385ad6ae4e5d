"""Several slots on one device train runs at the same time: on the CPU here, as on a GPU."""

from __future__ import annotations

import importlib.util
import pytest

from finetune.schedule.pool import SlotPool, WorkerHandle, WorkerSettings
from finetune.schedule.ray_pool import actor_resources
from finetune.track.timeline import overlap_fraction, seconds_with_at_least, training_intervals
from tests.test_training import _adapters, demo_config, finetune, small, states


def test_overlap_is_measured_from_intervals() -> None:
    assert seconds_with_at_least([(0, 2), (1, 3), (5, 6)], 2) == 1
    assert seconds_with_at_least([(0, 1), (1, 2)], 2) == 0
    assert overlap_fraction([(0, 2), (1, 3), (5, 6)]) == 1 / 4


@pytest.mark.slow
def test_two_slots_on_the_cpu_train_at_once_and_give_the_same_weights_as_one(tmp_path, demo_dir) -> None:
    """runs_per_device 2 on the CPU: two worker processes whose chunk intervals overlap, and whose
    adapters equal those of one worker byte for byte (each worker has one torch thread in both)."""
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "slots")
    common = ["--set", "experiment.threads_per_worker=1", "--set", "experiment.devices=cpu"]
    finetune(tmp_path, "run", str(config), *small("one", steps=12, chunks=3), *common, "--set", "experiment.runs_per_device=1")
    finetune(tmp_path, "run", str(config), *small("two", steps=12, chunks=3), *common, "--set", "experiment.runs_per_device=2")
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    assert set(states(two).values()) == {"completed"} and len(states(two)) == 4
    assert len(training_intervals(two)) == 12
    assert seconds_with_at_least(training_intervals(two), 2) > 0, "no two chunks trained at the same time"
    assert seconds_with_at_least(training_intervals(one), 2) == 0
    assert _adapters(one) == _adapters(two)


def test_workers_on_one_machine_split_its_cores() -> None:
    assert WorkerSettings(workers_on_host=4).for_worker(1).torch_threads(16) == 4
    assert WorkerSettings(workers_on_host=32).for_worker(1).torch_threads(16) == 1
    assert WorkerSettings(threads=3, workers_on_host=4).for_worker(1).torch_threads(16) == 3


def test_a_gang_holds_every_slot_of_its_devices_in_the_pool() -> None:
    pool = SlotPool()  # no processes: only the bookkeeping of slots
    pool.workers = [WorkerHandle(f"cuda:{d}/{s}", f"cuda:{d}", None, None, slot=s) for d in (0, 1) for s in (0, 1)]
    gang = WorkerHandle("ddp:2@cuda:0+cuda:1/0", "cuda:0+cuda:1", None, None, gang="ddp:2", layout=("cuda:0", "cuda:1"))
    assert pool.units(pool.workers[1]) == ("cuda:0#1",)
    assert pool.units(gang) == ("cuda:0#0", "cuda:0#1", "cuda:1#0", "cuda:1#1")


def test_ray_slot_actors_ask_for_their_share_of_a_gpu() -> None:
    assert actor_resources("gpu0", 4) == {"num_cpus": 1, "num_gpus": 0.25}
    assert actor_resources("gpu0", "auto") == {"num_cpus": 1, "num_gpus": 1 / 8}
    assert actor_resources("cpu", 4) == {"num_cpus": 1, "num_gpus": 0}


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'finetune[ray]')")
def test_ray_places_k_slot_actors_on_one_gpu_and_no_more() -> None:
    """A Ray runtime with one logical GPU (none is real here): two actors of runs_per_device 2 share it,
    a third waits; with auto, eight fit."""
    import ray

    ray.init(num_cpus=10, num_gpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024**2)
    try:
        @ray.remote
        class Probe:
            def gpu(self) -> list:
                return ray.get_runtime_context().get_accelerator_ids()["GPU"]

        pair = [Probe.options(**actor_resources("gpu0", 2)).remote() for _ in range(2)]
        assert ray.get([probe.gpu.remote() for probe in pair], timeout=60) == [["0"], ["0"]]
        third = Probe.options(**actor_resources("gpu0", 2)).remote()
        ready, _ = ray.wait([third.gpu.remote()], timeout=3)
        assert not ready, "a third half-GPU actor was placed on a full GPU"
        for actor in [*pair, third]:
            ray.kill(actor)
        auto = [Probe.options(**actor_resources("gpu0", "auto")).remote() for _ in range(8)]
        assert len(ray.get([probe.gpu.remote() for probe in auto], timeout=60)) == 8
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_run_that_moves_between_slots_and_back_trains_as_if_it_had_stayed(tmp_path, demo_dir) -> None:
    """Two slots take turns at one run: its chunk 1 on the second worker, chunk 2 back on the first, whose
    stale session (and the adapter left on its shared model) must give way. The weights equal those of
    the run trained straight through on one worker."""
    import torch

    from finetune.config.loading import load_document
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.plan.build import build_plan
    from finetune.train.residency import Budgets
    from finetune.train.workbench import Workbench
    from tests.test_training import _final_weights

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "moves")
    run = build_plan(load_document(config, overrides=["training_args.max_steps=9"])).runs[0]
    run.derived.chunk_steps = [3, 3, 3]
    validated = CONFIG_ADAPTER.validate_python(run.config)

    def train(directory: str, order: list[int]) -> dict:
        root = tmp_path / directory
        root.mkdir(exist_ok=True)
        benches = [Workbench(root, "cpu", Budgets(0, 1 << 40)) for _ in range(2)]
        checkpoint = None
        for chunk, slot in enumerate(order):
            checkpoint = benches[slot].train_chunk(run, validated, chunk, checkpoint, 8).checkpoint
            benches[slot].writer.wait_for()
        for bench in benches:
            bench.writer.close()
        return _final_weights(root, run.run_id)

    moved, stayed = train("moved", [0, 1, 0]), train("stayed", [0, 0, 0])
    assert moved.keys() == stayed.keys()
    assert all(torch.equal(moved[key], stayed[key]) for key in moved)


@pytest.mark.slow
def test_workers_end_when_their_controller_is_killed(tmp_path, demo_dir) -> None:
    """SIGKILL of the `finetune run` process alone (not its group): its two workers exit by themselves."""
    import contextlib
    import os
    import signal

    import psutil

    from tests.test_training import _wait_for_chunks, start_experiment

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "orphans")
    process = start_experiment(tmp_path, ["run", str(config), *small("orphans", steps=40, chunks=4),
                                          "--set", "experiment.devices=cpu", "--set", "experiment.runs_per_device=2"])
    try:
        _wait_for_chunks(tmp_path / "runs" / "orphans", 1, process)
        workers = [child for child in psutil.Process(process.pid).children() if "spawn_main" in " ".join(child.cmdline())]
        assert len(workers) == 2
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"workers outlived their controller: {[worker.pid for worker in alive]}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing left of the group is what this test wants
            os.killpg(process.pid, signal.SIGKILL)
