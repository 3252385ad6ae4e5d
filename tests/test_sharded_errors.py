"""Sharded checkpoint errors are errors (issue 30): a damaged shard or an adapter of another shape is found
from DCP's index before any work and said with the file named; torch's CheckpointException (a BaseException)
becomes an error a worker reports. A CPU gang is bounded by the machine's cores and memory."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.config.validation import CONFIG_ADAPTER
from tests.conftest import BASE_SFT

LORA_A = "base_model.model.model.layers.0.self_attn.{module}.lora_A.default.weight"
LORA_B = "base_model.model.model.layers.0.self_attn.{module}.lora_B.default.weight"


def sharded_chunk(directory: Path, r: int = 8, modules: tuple[str, ...] = ("q_proj",)) -> Path:
    """A sharded chunk as a LoRA fsdp run writes it (DCP, one process)."""
    import torch
    import torch.distributed.checkpoint as dcp

    model = {}
    for module in modules:
        model[LORA_A.format(module=module)] = torch.randn(r, 64)
        model[LORA_B.format(module=module)] = torch.randn(64, r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says it saves in one process
        dcp.save({"model": model, "optimizer": {"state": {}}}, checkpoint_id=str(directory))
    return directory


def config(**peft_kwargs):
    tree = copy.deepcopy(BASE_SFT)
    tree["peft_conf"]["peft_kwargs"].update(peft_kwargs)
    return CONFIG_ADAPTER.validate_python(tree)


@pytest.fixture(scope="module")
def chunk(tmp_path_factory) -> Path:
    return sharded_chunk(tmp_path_factory.mktemp("shards") / "chunk-1", r=4)


def test_an_adapter_of_the_same_shape_starts(chunk) -> None:
    from finetune.train.sharded import start_problem

    assert start_problem(chunk, "fsdp", config(r=4)) is None


@pytest.mark.parametrize("peft,words", [
    ({"r": 8}, "holds a LoRA adapter of r=4; this run has peft_conf.peft_kwargs.r=8"),
    ({"r": 4, "target_modules": ["q_proj", "v_proj"]}, "holds a LoRA adapter on q_proj; this run's peft_conf"),
    (None, "holds a LoRA adapter; this run trains the full model"),
])
def test_a_chunk_of_another_shape_is_refused_before_any_work(chunk, peft, words) -> None:
    from finetune.train.sharded import start_problem

    if peft is None:
        tree = copy.deepcopy(BASE_SFT)
        tree["peft_conf"] = {"peft_type": "NO_PEFT"}
        run = CONFIG_ADAPTER.validate_python(tree)
    else:
        run = config(**peft)
    assert words in (start_problem(chunk, "fsdp", run) or "")


def test_preparation_refuses_resume_from_a_chunk_of_another_shape(chunk) -> None:
    from finetune.schedule.preparation import ExperimentError, initial_checkpoint

    tree = copy.deepcopy(BASE_SFT)
    tree["experiment"]["distributed"] = "fsdp"
    tree["run_conf"]["resume_from_checkpoint"] = str(chunk)
    with pytest.raises(ExperimentError, match="r=4; this run has peft_conf.peft_kwargs.r=8"):
        initial_checkpoint(CONFIG_ADAPTER.validate_python(tree))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.sampled_from(["truncate", "delete", "index"]), keep=st.floats(0, 0.999),
       garbage=st.binary(min_size=0, max_size=4096))
def test_a_damaged_shard_is_named_before_any_work(tmp_path_factory, damage, keep, garbage) -> None:
    from finetune.train.sharded import start_problem

    directory = sharded_chunk(tmp_path_factory.mktemp("damaged") / "chunk-0", r=8)
    (shard,) = directory.glob("*.distcp")
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:int(shard.stat().st_size * keep)])
        says = f"its shard {shard} is truncated"
    elif damage == "delete":
        shard.unlink()
        says = f"its shard {shard} is missing"
    else:
        (directory / ".metadata").write_bytes(garbage)
        says = f"its index {directory / '.metadata'} cannot be read"
    problem = start_problem(directory, "fsdp", config(r=8)) or ""
    assert problem.startswith(f"{directory} cannot be read: {says}"), problem


def test_torch_s_checkpoint_exception_becomes_an_error_naming_the_directory_and_cause() -> None:
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from finetune.train.sharded import ShardedCheckpointError, checkpoint_failure

    raised = CheckpointException("load failed", {1: (FileNotFoundError("no __1_0.distcp"), traceback.StackSummary()),
                                                 0: (RuntimeError("size mismatch\nmore lines"), traceback.StackSummary())})
    assert not isinstance(raised, Exception)  # why a worker's `except Exception` let it end the gang
    error = checkpoint_failure(Path("/x/chunk-1"), "read", raised)
    assert isinstance(error, ShardedCheckpointError) and isinstance(error, Exception)
    assert str(error) == "the sharded checkpoint /x/chunk-1 cannot be read (rank 0 and others): RuntimeError: size mismatch"


@pytest.mark.parametrize("width,cores,available,words", [
    (64, 16, 100.0, "64 processes per run on the CPU, but this machine has 16 core(s); at most 16"),
    (8, 16, 2.0, "8 processes per run on the CPU need at least 4.0 GB before the model, but 2.0 GB of memory is available"),
    (2, 1, 100.0, None),  # a gang of two always fits
    (16, 16, 100.0, None),
])
def test_a_cpu_gang_is_bounded_by_the_machine_s_cores_and_memory(width, cores, available, words) -> None:
    from finetune.train.preflight import cpu_gang_problems

    problems = cpu_gang_problems(width, cores, available)
    assert [message for _, message in problems] == ([words] if words else [])
    assert all(path == "experiment.devices_per_run" for path, _ in problems)


def test_a_run_of_64_cpu_processes_is_refused_where_its_gang_is_checked() -> None:
    import os

    from finetune.train.preflight import check_distributed

    tree = copy.deepcopy(BASE_SFT)
    if len(os.sched_getaffinity(0)) >= 64:
        pytest.skip("a machine of 64 cores or more may hold a gang of 64")
    tree["experiment"].update({"devices_per_run": 64, "distributed": "ddp"})
    problems = check_distributed(CONFIG_ADAPTER.validate_python(tree), ["cpu"])
    assert any(path == "experiment.devices_per_run" and "processes per run on the CPU" in message for path, message in problems)
