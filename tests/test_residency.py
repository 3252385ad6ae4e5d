"""Where a worker keeps runs' state between chunks: the placement arithmetic alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from finetune.train.residency import Budgets, Resident, plan_placement

MB = 1024**2


def test_everything_stays_on_the_gpu_while_it_fits() -> None:
    residents = [Resident("a", 10 * MB, 0), Resident("b", 10 * MB, 0), Resident("c", 0, 10 * MB)]
    assert plan_placement(residents, "c", Budgets(30 * MB, 100 * MB)) == ([], [])


def test_least_recently_used_runs_move_to_cpu_memory_first() -> None:
    residents = [Resident("old", 10 * MB, 0), Resident("mid", 10 * MB, 0), Resident("new", 10 * MB, 0)]
    offload, drop = plan_placement(residents, "new", Budgets(20 * MB, 100 * MB))
    assert offload == ["old"] and drop == []


def test_runs_beyond_the_cpu_budget_are_dropped_to_disk_never_the_active_one() -> None:
    residents = [Resident("old", 0, 10 * MB), Resident("mid", 0, 10 * MB), Resident("active", 0, 10 * MB)]
    offload, drop = plan_placement(residents, "active", Budgets(0, 10 * MB))
    assert drop == ["old"] and offload == []
    assert plan_placement(residents, "active", Budgets(0, 0))[1] == ["old", "mid"]


@given(
    st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), min_size=1, max_size=8),
    st.integers(0, 300), st.integers(0, 300), st.data(),
)
def test_the_plan_respects_both_budgets_or_moves_everything_it_may(sizes, gpu_budget, cpu_budget, data) -> None:
    residents = [Resident(f"r{i}", gpu, cpu) for i, (gpu, cpu) in enumerate(sizes)]
    active = data.draw(st.sampled_from([r.run_id for r in residents]))
    offload, drop = plan_placement(residents, active, Budgets(gpu_budget, cpu_budget))
    assert active not in offload and active not in drop
    assert not set(offload) & set(drop)
    on_gpu = {r.run_id: r.gpu_bytes for r in residents} | {active: sum(sizes[int(active[1:])])}
    for run_id in offload + drop:
        on_gpu[run_id] = 0
    others_on_gpu = [r for r in residents if r.run_id != active and on_gpu[r.run_id] > 0]
    assert sum(on_gpu.values()) <= gpu_budget or not others_on_gpu
