"""The scheduling policy alone: fairness, affinity, successive-halving rungs."""

from __future__ import annotations

import random

import pytest
from finetune.schedule.policy import RunView, Task, WorkerView, assign, slot_unit, slots_for


def next_task(runs: list[RunView], busy: set[str], worker: str, resident_keys: set[str]) -> Task | None:
    """What one free worker, alone in its pool, is given."""
    tasks = assign(runs, [WorkerView(worker, (worker,), resident_keys=frozenset(resident_keys))], busy)
    return tasks[0][1] if tasks else None


def views(done: list[int], total: int = 4, keys: list[str] | None = None) -> list[RunView]:
    keys = keys or ["a"] * len(done)
    return [RunView(f"r{i}", i, d, total, True, keys[i]) for i, d in enumerate(done)]


def test_fewest_chunks_first_then_plan_order() -> None:
    assert next_task(views([2, 1, 1, 3]), set(), "w0", {"a"}).run_id == "r1"
    assert next_task(views([2, 1, 1, 3]), {"r1"}, "w0", {"a"}).run_id == "r2"


def test_round_robin_gives_every_run_a_first_chunk_before_any_second() -> None:
    done = [0, 0, 0, 0]
    order = []
    for _ in range(8):
        task = next_task(views(done), set(), "w0", {"a"})
        order.append(task.run_id)
        done[int(task.run_id[1:])] += 1
    assert order[:4] == ["r0", "r1", "r2", "r3"] and sorted(order[4:]) == ["r0", "r1", "r2", "r3"]


def test_affinity_prefers_a_resident_base_among_equals() -> None:
    runs = views([1, 1, 0], keys=["m1", "m2", "m2"])
    assert next_task(runs, set(), "w0", {"m1"}).run_id == "r2"  # fewest chunks still wins
    runs = views([1, 1], keys=["m1", "m2"])
    assert next_task(runs, set(), "w0", {"m2"}).run_id == "r1"


def test_stopped_busy_and_finished_runs_are_skipped() -> None:
    runs = [RunView("a", 0, 0, 2, runnable=False), RunView("b", 1, 2, 2), RunView("c", 2, 1, 2)]
    assert next_task(runs, {"c"}, "w0", set()) is None
    assert next_task(runs, set(), "w0", set()).chunk == 1


def test_a_run_stays_with_the_worker_that_holds_it_until_its_chunks_are_durable() -> None:
    held = RunView("a", 0, 1, 4, home="w1", durable=False)
    free = RunView("b", 1, 2, 4)
    assert next_task([held, free], set(), "w0", set()).run_id == "b"  # w0 may not take "a" yet
    assert next_task([held, free], set(), "w1", set()).run_id == "a"
    durable = RunView("a", 0, 1, 4, home="w1", durable=True)
    assert next_task([durable, free], set(), "w0", set()).run_id == "a"  # fewest chunks: taken over


def test_among_equals_a_worker_prefers_the_runs_it_holds() -> None:
    runs = [RunView("a", 0, 1, 4, home="w1"), RunView("b", 1, 1, 4, home="w0")]
    assert next_task(runs, set(), "w0", set()).run_id == "b"
    assert next_task(runs, set(), "w1", set()).run_id == "a"


def test_slots_follow_the_measured_footprint() -> None:
    gib = 1024**3
    assert slots_for(80 * gib, 18 * gib, runnable=8) == 4  # 72 GiB usable / 18 GiB
    assert slots_for(80 * gib, 18 * gib, runnable=2) == 2  # never more workers than runs to train
    assert slots_for(80 * gib, 1 * gib, runnable=100) == 8  # capped
    assert slots_for(80 * gib, 90 * gib, runnable=4) == 1  # at least one
    assert slots_for(0, 0, runnable=4) == 1  # the CPU


# ---------------------------------------------------------------- slots: several runs on one device


def slots_of(device: str, count: int) -> tuple[str, ...]:
    return tuple(slot_unit(device, slot) for slot in range(count))


def test_two_slots_of_one_device_take_two_runs_at_once() -> None:
    workers = [WorkerView("w0", slots_of("cuda:0", 2)[:1]), WorkerView("w1", slots_of("cuda:0", 2)[1:])]
    assert assign(views([0, 0, 0]), workers, set()) == [("w0", Task("r0", 0)), ("w1", Task("r1", 0))]
    one_busy = [WorkerView("w0", slots_of("cuda:0", 2)[:1], busy=True), workers[1]]
    assert assign(views([0, 0, 0]), one_busy, {"r0"}) == [("w1", Task("r1", 0))], "a busy slot leaves the other free"


def test_a_gang_holds_every_slot_of_its_devices() -> None:
    singles = [WorkerView(f"w{d}{s}", (slot_unit(f"cuda:{d}", s),)) for d in range(2) for s in range(2)]
    gang = WorkerView("gang", slots_of("cuda:0", 2) + slots_of("cuda:1", 2), "ddp:2")
    one_slot_busy = [*singles[:3], WorkerView("w11", (slot_unit("cuda:1", 1),), busy=True), gang]
    assert assign([RunView("big", 0, 0, 2, gang="ddp:2")], one_slot_busy, set()) == [], "one busy slot keeps the gang out"
    gang_busy = [*singles, WorkerView("gang", gang.units, "ddp:2", busy=True)]
    assert assign(views([0, 0]), gang_busy, {"big"}) == [], "no slot of its devices starts while the gang trains"


# ---------------------------------------------------------------- gangs: runs on several devices


def two_gpus(slots: int = 1) -> list[WorkerView]:
    singles = [WorkerView(f"g{d}/{s}", (slot_unit(f"cuda:{d}", s),)) for d in range(2) for s in range(slots)]
    return [*singles, WorkerView("gang", slots_of("cuda:0", slots) + slots_of("cuda:1", slots), "ddp:2")]


def test_a_gang_run_starts_only_when_all_its_devices_are_free() -> None:
    runs = [RunView("big", 0, 0, 2, gang="ddp:2"), RunView("small", 1, 1, 2)]
    g0, g1, gang = two_gpus()
    busy_g1 = [g0, WorkerView(g1.worker_id, g1.units, busy=True), gang]
    # big cannot start while cuda:1 trains; it reserves cuda:0, so small (behind it in the order) waits too
    assert assign(runs, busy_g1, set()) == []
    assert assign(runs, two_gpus(), set()) == [("gang", Task("big", 0))]
    # while the gang trains, no single-device worker starts on its devices
    gang_busy = [g0, g1, WorkerView("gang", gang.units, "ddp:2", busy=True)]
    assert assign([RunView("small", 1, 0, 2)], gang_busy, set()) == []


def test_runs_ahead_of_a_waiting_gang_still_use_free_devices() -> None:
    runs = [RunView("a", 0, 0, 4), RunView("big", 1, 1, 4, gang="ddp:2"), RunView("b", 2, 1, 4)]
    assert assign(runs, two_gpus(), set()) == [("g0/0", Task("a", 0))]  # b is behind big: cuda:1 is held for big


def test_a_run_goes_only_to_a_worker_of_its_kind() -> None:
    runs = [RunView("fsdp", 0, 0, 2, gang="fsdp:2")]
    assert assign(runs, two_gpus(), set()) == []


def simulate(workers: list[WorkerView], runs: dict[str, tuple[str, int]], seed: int, steps: int = 400) -> list[dict[str, int]]:
    """Random chunk durations; returns chunks done per run after each event."""
    rng = random.Random(seed)
    done = {run_id: 0 for run_id in runs}
    busy: dict[str, tuple[str, float]] = {}  # worker -> (run, finishes at)
    now, history = 0.0, []
    for _ in range(steps):
        views = [RunView(r, i, done[r], total, gang=gang) for i, (r, (gang, total)) in enumerate(runs.items())]
        state = [WorkerView(w.worker_id, w.units, w.gang, busy=w.worker_id in busy) for w in workers]
        for worker_id, task in assign(views, state, {run for run, _ in busy.values()}):
            busy[worker_id] = (task.run_id, now + rng.uniform(0.5, 2.0))
        if not busy:
            break
        worker_id, (run_id, now) = min(busy.items(), key=lambda item: item[1][1])
        del busy[worker_id]
        done[run_id] += 1
        history.append(dict(done))
    return history


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_a_big_run_is_not_starved_by_many_small_ones(slots) -> None:
    runs = {f"s{i}": ("", 6) for i in range(8)} | {"big": ("ddp:2", 6)}
    for seed in range(20):
        history = simulate(two_gpus(slots), runs, seed)
        assert history[-1] == {run: 6 for run in runs}, "every run finishes"
        for done in history:
            small = [count for run, count in done.items() if run != "big" and count < 6]
            if small:
                assert done["big"] >= min(small) - 1, f"seed {seed}: the big run fell behind: {done}"
