"""Fused training (finetune.train.fused): several LoRA runs in one forward pass equal each run alone."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

# Three members that differ in everything a fused group allows: rank, alpha, learning rate, target modules,
# dropout and accumulation (so their optimizer steps and chunk boundaries fall on different micro-steps).
MEMBERS: dict[str, dict[str, Any]] = {
    "a": {"peft": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
          "lr": 1e-2, "batch": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 4}},
    "b": {"peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"], "lora_dropout": 0.1},
          "lr": 3e-3, "batch": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4}},
    "c": {"peft": {"r": 16, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "v_proj"], "lora_dropout": 0.05},
          "lr": 5e-3, "batch": {"total_train_batch_size": 12, "max_per_device_train_batch_size": 4}},
    # micro-batches of 2: its rows are often shorter than the others' and are padded to the group's longest (its
    # dropout is drawn on its rows cut back to its own length); rank 12: a scaling that is no power of two
    "d": {"peft": {"r": 12, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "v_proj"], "lora_dropout": 0.1},
          "lr": 5e-2, "batch": {"total_train_batch_size": 6, "max_per_device_train_batch_size": 2}, "optim": "sgd"},
}


def member_config(demo_dir: Path, base_config: dict[str, Any], name: str, steps: int, optim: str | None = None) -> Any:
    from finetune.config.models import CONFIG_ADAPTER

    member = MEMBERS[name]
    tree = copy.deepcopy(base_config)
    tree["data_conf"]["training_data"]["datasets"] = [{"path": str(demo_dir / "data" / "sft_train.jsonl")}]
    tree["run_conf"]["model"] = str(demo_dir / "model")
    tree["training_args"].update(max_steps=steps, max_grad_norm=1.0, logging_steps=1, learning_rate=member["lr"], seed=11,
                                 optim=optim or member.get("optim", "adamw_torch"))
    tree["batchsize_conf"] = member["batch"]
    tree["sft_args"] = {"train_on_completions_only": True}
    tree["peft_conf"]["peft_kwargs"] = member["peft"]
    return CONFIG_ADAPTER.validate_python(tree)


class LossLog:
    """The logged training loss of each run, by step."""

    def __init__(self) -> None:
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.progress: dict[str, list[tuple[int, int]]] = {}  # (step, tokens of its micro-batches), as a StepMeter sees it

    def meter(self, run_id: str) -> Any:
        from finetune.train.progress import batch_tokens

        steps = self.progress.setdefault(run_id, [])
        return lambda step, batches: steps.append((step, sum(batch_tokens(batch) for batch in batches)))

    def callback(self, run_id: str) -> Any:
        from transformers import TrainerCallback

        curves = self.curves.setdefault(run_id, [])

        class _Record(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                if logs and "loss" in logs:
                    curves.append((state.global_step, logs["loss"]))

        return _Record()


def build_sessions(configs: dict[str, Any], out: Path, shared: bool, log: LossLog) -> list[Any]:
    """A RunSession per config: all on one shared PeftModel (as a worker holds them), or each on its own base."""
    from finetune.train.fused import group_sessions

    sessions = group_sessions(configs, out, shared, callbacks=lambda name: [log.callback(name)])
    for session in sessions:
        session.on_step = log.meter(session.run_id)
    return sessions


def train_solo_and_fused(demo_dir: Path, base_config: dict[str, Any], out: Path, names: list[str], steps: int,
                         stops: dict[str, int]) -> tuple[list[Any], list[Any], LossLog, LossLog]:
    """Each member trained alone (on a base of its own, in two chunks) and the same members trained as one
    fused group on a shared base (first to `stops`, a chunk boundary of each member's own, then to `steps`)."""
    from finetune.train.fused import FusedGroup

    configs = {name: member_config(demo_dir, base_config, name, steps) for name in names}
    solo_log, fused_log = LossLog(), LossLog()
    solo = build_sessions(configs, out / "solo", shared=False, log=solo_log)
    fused = build_sessions(configs, out / "fused", shared=True, log=fused_log)
    for session in solo:
        session.train_until(stops[session.run_id])
        session.train_until(steps)
    group = FusedGroup(fused)
    group.train_until(stops)
    assert [session.step for session in fused] == [stops[name] for name in names]
    group.train_until({name: steps for name in names})
    assert [session.step for session in fused] == [steps] * len(names)
    return solo, fused, solo_log, fused_log


@pytest.mark.slow
def test_each_member_of_a_fused_group_trains_as_it_would_alone(demo_dir, base_config, tmp_path) -> None:
    """Members with micro-batches of one size see rows of one length at most micro-steps (the same data order;
    here 4 of 18 micro-steps pad one member, as their accumulations differ). What differs from training alone
    is the order of the sums in the stacked LoRA products (`fused_lora`: other members' blocks add exact zeros)
    and, at those 4 micro-steps, the padding (see the next test). Stated bound: a relative 1e-4 on each adapter
    tensor after 5 steps (2e-6 measured; a member whose dropout masks were drawn from another stream is off by
    0.4 to 0.7), and loss curves within a relative 1e-6 (equal measured)."""
    solo, fused, solo_log, fused_log = train_solo_and_fused(demo_dir, base_config, tmp_path, ["a", "b", "c"], steps=5,
                                                            stops={"a": 3, "b": 2, "c": 1})
    assert [session.trainer.args.gradient_accumulation_steps for session in fused] == [2, 1, 3]
    for alone, together in zip(solo, fused):
        mine, theirs = alone.trainable_state(), together.trainable_state()
        assert mine.keys() == theirs.keys()
        ratios = {key: relative_difference(mine[key], theirs[key]) for key in mine}
        assert max(ratios.values()) < 1e-4, (alone.run_id, ratios)
        curve, fused_curve = solo_log.curves[alone.run_id], fused_log.curves[alone.run_id]
        assert [step for step, _ in fused_curve] == [step for step, _ in curve] == [1, 2, 3, 4, 5]
        assert [loss for _, loss in fused_curve] == pytest.approx([loss for _, loss in curve], rel=1e-6)
        # progress (a terminal's bars, tokens/s) is reported at each of a member's own steps, as alone
        assert fused_log.progress[alone.run_id] == solo_log.progress[alone.run_id]
        assert [step for step, _ in fused_log.progress[alone.run_id]] == [1, 2, 3, 4, 5]
        assert all(tokens > 0 for _, tokens in fused_log.progress[alone.run_id])
        assert alone.rng["cpu"].equal(together.rng["cpu"])  # the dropout drew as much from the member's stream
        trained = [key for key in theirs if "lora_B" in key]
        assert trained and all(theirs[key].abs().sum() > 0 for key in trained)
    assert len(fused[1].trainable_state()) == 2 * 2 * 4  # b's target modules: its adapter only where it asked


@pytest.mark.slow
def test_a_member_padded_to_the_groups_longest_rows_stays_within_the_stated_bound(demo_dir, base_config, tmp_path) -> None:
    """d's micro-batches of 2 are often shorter than a's rows of 4: the group pads them. Two ops then give
    other last bits: attention reduces over the longer masked key length (hidden states within 1e-6), and
    TRL's chunked log-probability head on the CPU, whose per-token values move by up to ~1e-3 with the
    number of tokens it is given (it is ~1.6e-3 from log_softmax either way). Measured bound, with SGD
    (whose update is linear in the gradient): d's loss curve within a relative 5e-5 of d alone (up to 1.5e-5
    measured over ranks 12 and 16, with and without dropout; masks drawn from another stream move it by 1e-4
    to 1e-3), its adapter within a relative 1e-2 (norm of the difference over the norm; ~3e-3 measured) after
    4 steps; its dropout draws as much from its stream as alone; a, whose rows are the longest, within the
    stacked products' bound (1e-4)."""
    solo, fused, solo_log, fused_log = train_solo_and_fused(demo_dir, base_config, tmp_path, ["a", "d"], steps=4,
                                                            stops={"a": 2, "d": 3})
    a_alone, d_alone = (session.trainable_state() for session in solo)
    a_fused, d_fused = (session.trainable_state() for session in fused)
    assert max(relative_difference(a_alone[key], a_fused[key]) for key in a_alone) < 1e-4
    ratios = {key: relative_difference(d_alone[key], d_fused[key]) for key in d_alone}
    assert max(ratios.values()) < 1e-2, ratios
    assert solo[1].rng["cpu"].equal(fused[1].rng["cpu"])  # masks drawn on its own length: as many numbers as alone
    assert len(fused_log.curves["d"]) == len(solo_log.curves["d"]) == 4
    for (step, alone), (fused_step, together) in zip(solo_log.curves["d"], fused_log.curves["d"]):
        assert step == fused_step and together == pytest.approx(alone, rel=5e-5)


def relative_difference(left: Any, right: Any) -> float:
    """|left - right| / |left| (Frobenius norms); 0 when bitwise equal."""
    return float((left - right).norm() / left.norm())


def diverge_at(session: Any, step: int) -> Any:
    """A trainer callback that sets the run's first lora_A weight to NaN at the end of `step` (as a learning rate
    too high does), at the same step alone and in a group."""
    import torch
    from transformers import TrainerCallback

    class _Diverge(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == step:
                with torch.no_grad():
                    next(param for key, param in session.model.named_parameters()
                         if f"lora_A.{session.adapter_name}." in key).fill_(float("nan"))

    return _Diverge()


@pytest.mark.slow
def test_a_member_that_diverges_leaves_the_group_and_the_others_train_as_alone(demo_dir, base_config, tmp_path) -> None:
    """c's adapter turns NaN at the end of its step 2, in the middle of a chunk. In the stacked LoRA products its
    values would reach a's and b's rows and gradients (0 x NaN is NaN), which training alone never does: c leaves
    the group at the next micro-step and trains the rest of that chunk alone, and the next chunk alone from its
    start (NaN weights, as alone). a and b stay finite and within the bound of a padded member (their accumulations
    differ, so their rows are padded at some micro-steps: see the test above; SGD, linear in the gradient)."""
    import torch

    from finetune.train.fused import FusedGroup

    configs = {name: member_config(demo_dir, base_config, name, 5, optim="sgd") for name in "abc"}
    solo_log, fused_log = LossLog(), LossLog()
    solo = build_sessions(configs, tmp_path / "solo", shared=False, log=solo_log)
    fused = build_sessions(configs, tmp_path / "fused", shared=True, log=fused_log)
    for session in (solo[2], fused[2]):
        session.trainer.add_callback(diverge_at(session, step=2))
    for stop in (1, 3, 5):  # chunk boundaries: c diverges inside the second chunk
        for session in solo:
            session.train_until(stop)
    group = FusedGroup(fused)
    for stop in (1, 3, 5):
        group.train_until({name: stop for name in configs})
    assert [session.step for session in fused] == [5, 5, 5]
    for alone, together in zip(solo[:2], fused[:2]):
        mine, theirs = alone.trainable_state(), together.trainable_state()
        assert all(torch.isfinite(value).all() for value in theirs.values()), alone.run_id
        assert max(relative_difference(mine[key], theirs[key]) for key in mine) < 1e-2, alone.run_id
        assert [loss for _, loss in fused_log.curves[alone.run_id]] == pytest.approx(
            [loss for _, loss in solo_log.curves[alone.run_id]], rel=5e-5)
    # c as alone: NaN weights, and the same logged curve (HF's logging_nan_inf_filter logs a NaN loss as the mean so far)
    assert not torch.isfinite(next(value for key, value in fused[2].trainable_state().items() if "lora_A" in key)).all()
    assert fused_log.curves["c"] == solo_log.curves["c"] and len(fused_log.curves["c"]) == 5
    assert solo[2].rng["cpu"].equal(fused[2].rng["cpu"])  # its dropout drew from its own stream, alone and in the group


def test_the_hooks_add_each_adapter_to_its_own_rows_as_peft_adds_it_alone(demo_dir, base_config) -> None:
    """The seam (fused_lora): a hooked forward of three adapters' rows equals PEFT's own forward of each
    adapter active alone, row for row (within float32's rounding: a row given another adapter is off by ~1e-2),
    and leaving the hooks restores PEFT's layers (active adapter trainable)."""
    import torch

    from finetune.train.fused import concatenate
    from finetune.train.fused_lora import FusedLora
    from finetune.train.model import load_base_model

    configs = {name: member_config(demo_dir, base_config, name, 1) for name in "abcd"}
    configs["d"].peft_conf.peft_kwargs.target_modules = ["lm_head"]  # a layer no member's adapter is on
    configs["c"].peft_conf.peft_kwargs.r = 12  # scaling 16/12: no power of two
    model = None
    for name, config in configs.items():
        base = load_base_model(config, 437) if model is None else model.get_base_model()
        model = attach_adapter_for_test(base, model, config, name)
    configs.pop("d")  # a resident run outside the group: its adapter, active before, must touch no row
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.normal_(0, 0.05)  # LoRA's B starts at zero: make every adapter change its rows
    model.eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 435, (size, length), generator=generator),
                "attention_mask": torch.ones(size, length, dtype=torch.long)} for size, length in ((2, 9), (3, 9), (1, 9))]
    alone = []
    for name, batch in zip(configs, batches):
        model.set_adapter(name)
        alone.append(model(**batch).logits)
    model.set_adapter("d")
    fused = FusedLora(model, list(configs), "cpu")
    batch, rows = concatenate(batches, list(configs), [None] * 3, 0)
    with torch.no_grad(), fused.active():
        fused.start_micro_step(rows)
        together = model(**batch).logits
        assert all(layer.lora_A[name].weight.requires_grad == (name in configs) for layer in fused.layers for name in layer.lora_A)
    for own, place in zip(alone, rows):  # the same up to the order of the sums in the stacked products
        torch.testing.assert_close(together[place.start:place.stop], own, rtol=1e-5, atol=1e-6)
    assert not torch.equal(alone[0][0], alone[1][0])  # the adapters differ
    trainable = {key.split(".")[-2] for key, param in model.named_parameters() if param.requires_grad}
    assert trainable == {"d"}  # PEFT's state again: the active adapter alone trains


def attach_adapter_for_test(base: Any, shared: Any, config: Any, name: str) -> Any:
    from finetune.train.adapter import attach_adapter

    return attach_adapter(base, shared, config.peft_conf, [], name, seed=7)


@pytest.mark.slow
def test_runs_that_cannot_fuse_are_refused_with_their_reasons(demo_dir, base_config, tmp_path) -> None:
    from finetune.train.fused import FusedGroup, fuse_problems

    configs = {name: member_config(demo_dir, base_config, name, 2) for name in "abc"}
    configs["b"].peft_conf.peft_kwargs.use_dora = True
    configs["c"].peft_conf.peft_kwargs.lora_bias = True  # the stacked products carry no bias
    sessions = build_sessions(configs, tmp_path, shared=True, log=LossLog())
    problems = fuse_problems(sessions)
    assert any(problem.startswith("run b:") and "variant" in problem for problem in problems)
    assert any(problem.startswith("run c:") and "lora_bias" in problem for problem in problems)
    assert not any(problem.startswith("run a:") for problem in problems)
    sessions = sessions[:2]
    assert fuse_problems(sessions[:1]) == ["a fused group needs at least two runs"]
    with pytest.raises(ValueError, match="cannot train fused"):
        FusedGroup(sessions)
    other = build_sessions({"c": member_config(demo_dir, base_config, "c", 2)}, tmp_path / "other", shared=True, log=LossLog())
    assert "the runs do not share one loaded base model" in fuse_problems([sessions[0], other[0]])
    extra = member_config(demo_dir, base_config, "a", 2).peft_conf.model_copy(deep=True)
    extra.peft_kwargs.modules_to_save = ["lm_head"]
    attach_adapter_for_test(sessions[0].model.get_base_model(), sessions[0].model, type("C", (), {"peft_conf": extra})(), "x")
    assert any("a resident run trains whole modules" in problem for problem in fuse_problems([sessions[0], other[0]]))
    sessions[0].model.get_base_model().config.attention_dropout = 0.1
    assert "the base model's config sets attention_dropout=0.1" in fuse_problems([sessions[0], other[0]])
