"""Runs on several devices, the parts that need no training: sharding, layouts, arguments, checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.config.validation import CONFIG_ADAPTER
from finetune.plan.derive import derive
from finetune.schedule.gang import gang_kind, gang_layouts, units_of
from finetune.train.data_order import epoch_batches
from finetune.train.preflight import check_distributed
from finetune.train.trainer import strategy_arguments
from tests.conftest import BASE_SFT
from tests.helpers import issues_of, schema_errors


def config_with(**experiment):
    tree = copy.deepcopy(BASE_SFT)
    tree.setdefault("experiment", {}).update(experiment)
    return CONFIG_ADAPTER.validate_python(tree)


@settings(max_examples=200, deadline=None)
@given(examples=st.integers(1, 60), batch=st.integers(1, 6), world=st.integers(2, 4), drop_last=st.booleans())
def test_a_gang_step_reads_what_one_process_reads_with_the_whole_batch(examples, batch, world, drop_last) -> None:
    """Round r of a gang (micro-batch r of every rank, in rank order) holds the samples of micro-batch r
    of one process whose batch is `world` times larger; every rank takes the same number of steps."""
    indices = list(range(examples))
    shards = [epoch_batches(indices, batch, drop_last, rank, world) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1
    whole = epoch_batches(indices, batch * world, drop_last)
    full_rounds = examples // (batch * world)
    for round_index in range(full_rounds):
        assert sum((shard[round_index] for shard in shards), []) == whole[round_index]
    seen = {index for shard in shards for micro in shard for index in micro}
    if drop_last:  # as accelerate: an incomplete last round is dropped
        assert seen >= set(indices[: full_rounds * batch * world])
    else:
        assert seen == set(indices)


def test_a_short_last_round_wraps_around_to_the_start_of_the_epoch() -> None:
    assert epoch_batches(list(range(10)), 2, False, 0, 2) == [[0, 1], [4, 5], [8, 9]]
    assert epoch_batches(list(range(10)), 2, False, 1, 2) == [[2, 3], [6, 7], [0, 1]]


def test_gangs_take_consecutive_gpus_and_the_cpu_is_one_unit() -> None:
    gpus = [f"cuda:{index}" for index in range(5)]
    assert gang_layouts(gpus, 2) == [("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
    assert gang_layouts(gpus, 8) == []
    assert gang_layouts(["cpu"], 3) == [("cpu", "cpu", "cpu")]
    assert units_of(("cpu", "cpu")) == ("cpu",) and units_of(("cuda:0", "cuda:1")) == ("cuda:0", "cuda:1")


def test_the_kind_of_worker_a_run_needs() -> None:
    assert gang_kind(config_with().experiment) == ""
    assert gang_kind(config_with(devices_per_run=2).experiment) == "ddp:2"
    assert gang_kind(config_with(distributed="fsdp").experiment) == "fsdp:1"  # sharded even on one device


def test_the_batch_is_split_over_the_runs_processes() -> None:
    tree = copy.deepcopy(BASE_SFT)
    tree["batchsize_conf"] = {"total_train_batch_size": 32, "max_per_device_train_batch_size": 4}
    tree["experiment"] = {"devices_per_run": 4}
    derived = derive(CONFIG_ADAPTER.validate_python(tree), 320)
    assert (derived.num_processes, derived.per_device_train_batch_size, derived.gradient_accumulation_steps) == (4, 4, 2)
    assert derived.steps_per_epoch == 10


def test_strategies_become_trainer_settings() -> None:
    assert strategy_arguments("ddp", {}) == {"ddp_find_unused_parameters": False}
    assert strategy_arguments("fsdp", {}) == strategy_arguments("fsdp_grad_op", {}) == {}, "accelerate is kept out of FSDP"


@pytest.mark.parametrize("experiment,devices,problem", [
    ({"devices_per_run": 2}, ["cpu"], None),
    ({"devices_per_run": 4}, ["cuda:0", "cuda:1"], "4 devices per run, but this experiment has 2 GPU(s)"),
    ({"distributed": "fsdp"}, ["cpu"], None),
    ({"distributed": "fsdp_grad_op", "devices_per_run": 2, "fsdp_cpu_offload": True}, ["cpu"], None),
    ({"devices_per_run": 2, "backend": "ray"}, None, "backend: local"),
    ({"distributed": "fsdp", "devices_per_run": 2}, ["cuda:0", "cuda:1"], None),
    ({"fsdp_cpu_offload": True}, ["cpu"], "set experiment.distributed: fsdp"),
    ({"distributed": "deepspeed_zero3", "devices_per_run": 2}, ["cuda:0", "cuda:1"], "use distributed: fsdp,"),
    ({"distributed": "deepspeed_zero1", "devices_per_run": 2}, ["cuda:0", "cuda:1"], "use distributed: fsdp_grad_op"),
])
def test_runs_on_several_devices_are_checked_before_any_work(experiment, devices, problem) -> None:
    found = check_distributed(config_with(**experiment), devices)
    if problem is None:
        assert found == []
    else:
        assert any(problem in text for _, text in found), found


def test_trainer_sharding_arguments_point_to_experiment_distributed() -> None:
    tree = copy.deepcopy(BASE_SFT)
    tree["training_args"].update(fsdp="full_shard", deepspeed={"zero_optimization": {"stage": 1}})
    found = check_distributed(CONFIG_ADAPTER.validate_python(tree), ["cpu"])
    assert [key for key, _ in found] == ["training_args.fsdp", "training_args.deepspeed"]
    assert all("set experiment.distributed" in text for _, text in found)


def test_only_the_per_run_keys_of_experiment_take_knobs() -> None:
    tree = copy.deepcopy(BASE_SFT)
    tree["experiment"] = {"devices_per_run": {"$list": [1, 2]}, "distributed": {"$list": ["ddp", "fsdp"]}}
    assert issues_of(tree) == [] and schema_errors(tree) == []
    tree["experiment"] = {"num_chunks": {"$list": [1, 2]}}
    (issue,) = issues_of(tree)
    assert issue.path == "experiment.num_chunks" and "devices_per_run" in (issue.allowed or "")
    assert schema_errors(tree), "the sweep schema refuses it too"


def test_an_unknown_strategy_lists_the_known_ones() -> None:
    tree = copy.deepcopy(BASE_SFT)
    tree["experiment"] = {"distributed": "zero2"}
    (issue,) = issues_of(tree)
    assert issue.path == "experiment.distributed" and "deepspeed_zero3" in f"{issue.message} {issue.allowed}"


class _Target:
    """The little of a controller that a clone request reads (`control.ControlTarget`)."""

    def __init__(self, plan, devices):
        from finetune.schedule.records import RunRecord, RunStatus

        self.root, self.devices, self.added = Path("."), devices, []
        self.records = {run.run_id: RunRecord(run, CONFIG_ADAPTER.validate_python(run.config), "", "", RunStatus.PENDING, index,
                                              0, None, None, 0) for index, run in enumerate(plan.runs)}

    def record(self, run_id):
        return self.records.get(run_id)

    def run_ids(self):
        return set(self.records)

    def prepare(self, run):
        """The part of the controller's preparation that depends on its devices (no tokenizer or data here)."""
        from finetune.schedule.control import RequestRejected
        from finetune.train.preflight import check_distributed

        problems = check_distributed(CONFIG_ADAPTER.validate_python(run.config), self.devices)
        if problems:
            raise RequestRejected(problems)
        return run

    def busy(self, run_id):
        return False

    def training(self, run_id):
        return False

    def set_status(self, run_id, status):
        raise AssertionError("a clone changes no run's state")

    def add_run(self, run):
        self.added.append(run)

    def local_devices(self):
        return self.devices


@pytest.mark.parametrize("change,outcome", [
    ("experiment.devices_per_run=2", "applied"),
    ("experiment.devices_per_run=8", "rejected: experiment.devices_per_run: 8 devices per run, but this experiment has 4 GPU(s)"),
    ("experiment.devices_per_run=3", "rejected: batchsize_conf.total_train_batch_size 8 cannot be split evenly over 3 processes"),
    ("experiment.distributed=fsdp", "applied"),
    ("experiment.distributed=deepspeed_zero3", "rejected: experiment.distributed: deepspeed_zero3 is not trained by finetune"),
])
def test_a_clone_on_more_devices_is_checked_as_a_new_run_would_be(change, outcome) -> None:
    from finetune.plan.build import build_plan
    from finetune.schedule.control import apply_request
    from tests.helpers import doc_of

    tree = copy.deepcopy(BASE_SFT)
    tree["batchsize_conf"] = {"total_train_batch_size": 8, "max_per_device_train_batch_size": 8}
    plan = build_plan(doc_of(tree), train_examples=lambda config: 64)
    target = _Target(plan, [f"cuda:{index}" for index in range(4)])
    status = apply_request(target, "clone", plan.runs[0].run_id, {"set": [change]})
    assert status.startswith(outcome), status
    if change == "experiment.devices_per_run=2":
        assert target.added[0].derived.num_processes == 2 and target.added[0].derived.per_device_train_batch_size == 4


def test_a_sharded_position_moves_to_the_same_place_in_the_epoch_on_another_gang() -> None:
    from finetune.train.data_order import DataPosition
    from finetune.train.sharded import resharded_position

    # 2 ranks x 4 per micro-batch, 10 rounds an epoch; 1 process x 4 per micro-batch, 2 per step: 20.
    assert resharded_position(DataPosition(1, 3), 10, 20) == DataPosition(1, 6)
    assert resharded_position(DataPosition(1, 10), 10, 20) == DataPosition(2, 0), "an epoch's end is the next one's start"
    assert resharded_position(DataPosition(0, 6), 20, 10) == DataPosition(0, 3)


def test_fsdp_shards_the_decoder_layers_of_a_model_and_of_its_adapter(demo_dir) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.train.sharded import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    layers = decoder_layers(model)
    assert layers == list(model.model.layers) and len(layers) == model.config.num_hidden_layers
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(adapted) == layers
    model._no_split_modules = []
    with pytest.raises(ValueError, match="FSDP cannot shard it by layer"):
        decoder_layers(model)


@pytest.mark.parametrize("files,sharded,initial,problem", [
    ({"state.pt", ".metadata"}, False, False, "was written sharded (fsdp); resume it with the experiment.distributed"),
    ({"state.pt", "model.safetensors"}, True, False, "was written whole (ddp or one device)"),
    ({"config.json", "model.safetensors"}, True, True, "a sharded (fsdp) run starts only from a sharded chunk-K"),
    ({"state.pt", ".metadata"}, False, True, "which a ddp run does not load; start this run with experiment.distributed: fsdp"),
    ({"config.json"}, False, True, "is not a training checkpoint"),
])
def test_a_checkpoint_is_read_by_a_run_of_its_own_kind(tmp_path, files, sharded, initial, problem) -> None:
    from finetune.train.session import RunSession
    from finetune.train.sharded import ShardedSession
    from finetune.train.resume import resume_session

    for name in files:
        (tmp_path / name).write_bytes(b"")
    session = (ShardedSession if sharded else RunSession).__new__(ShardedSession if sharded else RunSession)
    session.run_id, session.strategy = "r1", "fsdp"
    with pytest.raises(RuntimeError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        resume_session(session, str(tmp_path), initial)


def test_a_new_run_starts_from_a_whole_chunk_and_does_not_continue_it(tmp_path, monkeypatch) -> None:
    """At step 0 a chunk-K of another run (state.pt beside its weights) is where a run starts from: its
    weights and optimizer, not its step, which would not be this run's."""
    import finetune.train.export
    from finetune.train.session import RunSession
    from finetune.train.resume import resume_session

    for name in ("state.pt", "model.safetensors", "optimizer.pt"):
        (tmp_path / name).write_bytes(b"")
    started: list[str] = []
    monkeypatch.setattr(finetune.train.export, "load_initial_checkpoint", lambda session, checkpoint: started.append(checkpoint))
    session = RunSession.__new__(RunSession)
    session.run_id = "r1"
    resume_session(session, str(tmp_path), initial=True)
    assert started == [str(tmp_path)]


def test_a_run_started_from_another_runs_optimizer_keeps_its_own_settings() -> None:
    import torch

    from finetune.train.checkpoint import own_hyperparameters

    weight = torch.nn.Parameter(torch.ones(3))
    other = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.5)
    weight.grad = torch.ones(3)
    other.step()
    mine = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-4, weight_decay=0.0)
    with own_hyperparameters(mine):
        mine.load_state_dict(other.state_dict())
    assert (mine.param_groups[0]["lr"], mine.param_groups[0]["weight_decay"]) == (1e-4, 0.0)
    assert torch.equal(next(iter(mine.state.values()))["exp_avg"], next(iter(other.state.values()))["exp_avg"])
