"""A PBT exploit continues its donor's full state with its own (perturbed) hyperparameters: the optimizer's
moments and the schedule's position are the donor's, the learning rate is the clone's own at that position."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from finetune.train.session import with_own_hyperparameters  # noqa: E402


def optimizer_and_schedule(lr: float, weight_decay: float = 0.0):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))  # warm-up over 4 steps
    return weight, optimizer, schedule


def train(weight, optimizer, schedule, steps: int) -> None:
    for _ in range(steps):
        weight.grad = torch.full_like(weight, 0.5)
        optimizer.step()
        schedule.step()


def test_a_clone_keeps_the_donor_s_moments_and_position_with_its_own_rate() -> None:
    donor = optimizer_and_schedule(1e-3)
    train(*donor, steps=2)  # half-way through the warm-up
    saved_optimizer, saved_schedule = donor[1].state_dict(), donor[2].state_dict()
    weight, optimizer, schedule = optimizer_and_schedule(2e-3, weight_decay=0.1)  # the clone: rate x2, decay changed
    configured = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    new_optimizer, new_schedule = with_own_hyperparameters(saved_optimizer, saved_schedule, configured)
    optimizer.load_state_dict(new_optimizer)
    schedule.load_state_dict(new_schedule)
    assert schedule.last_epoch == 2, "no new warm-up: the donor's position"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 3 / 4), "its own rate at the donor's position"
    assert schedule.get_last_lr()[0] == pytest.approx(2e-3 * 3 / 4) and optimizer.param_groups[0]["weight_decay"] == 0.1
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_optimizer["state"][0]["exp_avg"])
    train(weight, optimizer, schedule, steps=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3), "the schedule goes on from there at the clone's base rate"


def test_a_run_s_own_checkpoint_is_restored_unchanged() -> None:
    run = optimizer_and_schedule(1e-3)
    train(*run, steps=2)
    saved_optimizer, saved_schedule = run[1].state_dict(), run[2].state_dict()
    _, fresh, _ = optimizer_and_schedule(1e-3)
    configured = [{key: value for key, value in group.items() if key != "params"} for group in fresh.param_groups]
    assert with_own_hyperparameters(saved_optimizer, saved_schedule, configured) == (saved_optimizer, saved_schedule)
