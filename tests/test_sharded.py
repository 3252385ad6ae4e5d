"""Sharded runs (FSDP2) trained for real: gangs of 2 CPU processes (gloo) against 1 process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_gangs import ON_CPU, _labels, _workers, events
from tests.test_training import (
    _final_weights, _wait_for_chunks, chunk_rows, demo_config, finetune, generate_from, small, start_experiment, states,
)

pytestmark = pytest.mark.slow
FSDP = ["--set", "experiment.distributed=fsdp"]
FULL = ["--set", "peft_conf={peft_type: NO_PEFT}", "--set", "training_args.learning_rate=1e-4"]
LORA = ["--set", "peft_conf.peft_kwargs.lora_dropout=0.1"]  # dropout: every rank's RNG state matters


def final_losses(root: Path) -> dict[tuple[str, str], float]:
    """The final eval_loss of each run by (its PEFT type, its kind of worker)."""
    import sqlite3

    plan = json.loads((root / "plan.json").read_text())
    with sqlite3.connect(root / "state.db") as db:
        rows = db.execute("SELECT run_id, metrics FROM chunks ORDER BY chunk").fetchall()
    last = {run_id: json.loads(values)["eval_loss"] for run_id, values in rows}
    kinds = {run["run_id"]: (run["config"]["peft_conf"]["peft_type"], "{}:{}".format(
        run["config"]["experiment"].get("distributed", "ddp"), run["config"]["experiment"].get("devices_per_run", 1)))
        for run in plan["runs"]}
    return {kinds[run_id]: loss for run_id, loss in last.items()}


def test_two_sharded_ranks_reach_the_eval_loss_of_one_process_for_lora_and_full(tmp_path, demo_dir) -> None:
    """One process trains as usual; gangs of 2 shard the same run with FSDP (fsdp, and fsdp_grad_op with
    its shards offloaded to CPU memory), each rank half the batch."""
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "sharded")
    both = ["--set", "peft_conf=!list [{peft_type: NO_PEFT}, {peft_type: LORA, peft_kwargs: {r: 4, lora_alpha: 16, "
            "target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}]",
            "--set", "groups=[{}, {experiment: {devices_per_run: 2, distributed: fsdp}}, "
            "{experiment: {devices_per_run: 2, distributed: fsdp_grad_op, fsdp_cpu_offload: true}}]"]
    args = [*small("sharded", steps=8, chunks=2), *ON_CPU, *both]
    plan = finetune(tmp_path, "plan", str(config), *args)
    assert "4x2" in plan.stdout and "8x1" in plan.stdout, plan.stdout  # the same total batch of 8
    finetune(tmp_path, "run", str(config), *args)
    root = tmp_path / "runs" / "sharded"
    assert set(states(root).values()) == {"completed"}
    losses = final_losses(root)
    for peft_type in ("NO_PEFT", "LORA"):
        one = losses[(peft_type, "ddp:1")]
        for two in (losses[(peft_type, "fsdp:2")], losses[(peft_type, "fsdp_grad_op:2")]):
            assert abs(one - two) / one < 0.01, losses
    for final in root.glob("runs/*/checkpoint-final"):  # saved whole, loadable as transformers and PEFT load them
        generate_from(final)


@pytest.mark.parametrize("method", [LORA, FULL], ids=["lora", "full"])
def test_a_sharded_run_in_chunks_taking_turns_ends_bitwise_as_in_one_chunk(tmp_path, demo_dir, method) -> None:
    """Two runs take turns on one gang, which holds one run at a time: every turn reloads the run from
    its sharded checkpoint (same ranks, so DCP hands each rank its own shard back)."""
    import torch

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "turns")
    common = [*ON_CPU, *FSDP, "--set", "experiment.devices_per_run=2", *method, "--set", "training_args.learning_rate=!list [1e-4, 1e-3]"]
    finetune(tmp_path, "run", str(config), *common, *small("turns", steps=8, chunks=4))
    finetune(tmp_path, "run", str(config), *common, *small("straight", steps=8, chunks=1))
    turns, straight = tmp_path / "runs" / "turns", tmp_path / "runs" / "straight"
    assert len(chunk_rows(turns)) == 8 and set(states(turns).values()) == set(states(straight).values()) == {"completed"}
    by_label = {label: run_id for run_id, label in _labels(straight).items()}
    for run_id, label in _labels(turns).items():
        chunked, whole = _final_weights(turns, run_id), _final_weights(straight, by_label[label])
        assert chunked.keys() == whole.keys()
        assert all(torch.equal(chunked[key], whole[key]) for key in whole), label


def test_sigkill_of_one_sharded_rank_retries_the_chunk_and_records_no_half_chunk(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "rankkill")
    args = ["run", str(config), *small("rankkill", steps=24, chunks=4), *ON_CPU, *FSDP, *FULL, "--set", "experiment.devices_per_run=2"]
    process = start_experiment(tmp_path, args)
    root = tmp_path / "runs" / "rankkill"
    _wait_for_chunks(root, 1, process)
    ranks = _workers(process.pid)
    assert len(ranks) == 2, "the gang's two ranks"
    ranks[1].kill()
    assert process.wait(timeout=400) == 0
    (run,) = states(root)
    assert states(root) == {run: "completed"}
    assert chunk_rows(root) == [(run, chunk) for chunk in range(4)], "each chunk recorded once, none half"
    assert all("exit code -9" in event["error"] for event in events(root, "chunk_lost"))
    run_dir = root / "runs" / run
    assert [path.name for path in run_dir.iterdir() if path.name.startswith(".")] == [], "no partly written shards are left"
    for chunk in run_dir.glob("chunk-*"):  # a recorded sharded checkpoint is whole: every rank's shard, the index, the state
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.pt"} <= {path.name for path in chunk.iterdir()}


def resume_on_one_rank(root: str, run_id: str, checkpoint: str, out: str) -> None:
    """Train the rest of a run that a gang of 2 began, in 1 process, from its sharded checkpoint
    (run in a process of its own: it joins a process group of one)."""
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.plan.derive import derive
    from finetune.schedule.folder import read_plan
    from finetune.schedule.gang import free_port
    from finetune.train.distributed import GangRank, join_gang
    from finetune.train.residency import Budgets
    from finetune.train.workbench import Workbench

    join_gang(GangRank(0, 1, f"tcp://127.0.0.1:{free_port()}", ("cpu",)))
    run = next(planned for planned in read_plan(Path(root)).runs if planned.run_id == run_id)
    run.config["experiment"]["devices_per_run"] = 1
    config = CONFIG_ADAPTER.validate_python(run.config)
    derived = derive(config, run.derived.train_examples)
    derived.total_steps, derived.chunk_steps = run.derived.total_steps, run.derived.chunk_steps
    run = run.model_copy(update={"derived": derived})
    Path(out).mkdir(parents=True, exist_ok=True)
    bench = Workbench(Path(out), "cpu", Budgets(0, 1 << 40), gang_rank=0)
    first = int(Path(checkpoint).name.removeprefix("chunk-")) + 1
    for chunk in range(first, len(derived.chunk_steps)):
        checkpoint = bench.train_chunk(run, config, chunk, checkpoint, config.experiment.max_eval_samples).checkpoint
        bench.writer.wait_for()
    bench.writer.close()


def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one(tmp_path, demo_dir) -> None:
    """Killed after two of four chunks; the rest trained by the same gang of 2 (`--resume`) and, from
    the same sharded checkpoint, by 1 process: DCP gives the one rank both halves of every tensor."""
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "two")
    args = ["run", str(config), *small("two", steps=16, chunks=4), *ON_CPU, *FSDP, *FULL, "--set", "experiment.devices_per_run=2"]
    process = start_experiment(tmp_path, args)
    root = tmp_path / "runs" / "two"
    _wait_for_chunks(root, 2, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(1)
    (run,) = states(root)
    # The newest checkpoint on disk (the one before it may not be pruned yet when the controller dies).
    checkpoint = max((root / "runs" / run).glob("chunk-*"), key=lambda path: int(path.name.removeprefix("chunk-")))
    kept = tmp_path / "kept" / checkpoint.name
    shutil.copytree(checkpoint, kept)
    finetune(tmp_path, "run", "--resume", str(root))
    code = f"from tests.test_sharded import resume_on_one_rank; resume_on_one_rank({str(root)!r}, {run!r}, {str(kept)!r}, {str(tmp_path / 'one')!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = _final_weights(root, run), _final_weights(tmp_path / "one", run)
    assert two.keys() == one.keys()
    import torch

    # The batch is split otherwise (one process: 8 per micro-batch, not 2 x 4), so the sums are added in
    # another order: close, not bitwise (6e-6 at most when measured, learning rate 1e-4).
    for key in two:
        assert torch.allclose(two[key], one[key], atol=5e-5, rtol=0), (key, (two[key] - one[key]).abs().max())


@pytest.mark.parametrize("example", ["dpo.yaml", "grpo.yaml"])
def test_dpo_and_grpo_train_sharded(tmp_path, demo_dir, example) -> None:
    """DPO's reference is an adapter TRL adds when its trainer is built, before FSDP shards the model;
    GRPO generates with the sharded model (FSDP gathers the root's weights for `generate` too)."""
    config = demo_config(tmp_path, demo_dir, example, "methods")
    finetune(tmp_path, "run", str(config), *small("methods", steps=2, chunks=2), "--set", "experiment.devices=cpu",
             "--set", "experiment.devices_per_run=2", *FSDP)
    root = tmp_path / "runs" / "methods"
    assert set(states(root).values()) == {"completed"}
    finals = sorted(root.glob("runs/*/checkpoint-final"))
    assert len(finals) == len(states(root))
    generate_from(finals[0])


def _save_while_training(rank: int, port: int, directory: str) -> None:
    """One rank: start a background save of a sharded model, train on, then read the save back."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    from finetune.train.sharded import _Saves

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train() -> None:
        model(torch.randn(4, 32)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    train()
    weights, moments = get_state_dict(model, optimizer)
    at_save = {key: value.full_tensor().clone() for key, value in weights.items()}
    first = _Saves.start({"model": weights, "optimizer": moments}, Path(directory) / "a")
    train()  # the ranks train on while the shards are written
    second = _Saves.start(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))), Path(directory) / "b")
    assert first.done(), "one save in flight at a time"
    second.result()
    loaded = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
    dcp.load(loaded, checkpoint_id=str(Path(directory) / "a"))
    assert all(torch.equal(at_save[key], value.full_tensor()) for key, value in loaded["model"].items())
    dist.destroy_process_group()


def save_while_training(directory: str) -> None:
    import torch.multiprocessing

    from finetune.schedule.gang import free_port

    torch.multiprocessing.spawn(_save_while_training, args=(free_port(), directory), nprocs=2)


def test_a_background_save_holds_the_state_of_the_chunk_boundary(tmp_path) -> None:
    """dcp.async_save copies each shard at the boundary: what training does next is not in the checkpoint."""
    code = f"from tests.test_sharded import save_while_training; save_while_training({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "a" / ".metadata").is_file() and (tmp_path / "b" / ".metadata").is_file()


def logged_losses(root: Path) -> list[float]:
    """The training loss of the experiment's one run, step by step."""
    import sqlite3

    with sqlite3.connect(root / "state.db") as db:
        return [value for (value,) in db.execute("SELECT value FROM metrics WHERE name = 'loss' ORDER BY step")]


def test_a_new_run_starts_from_a_sharded_chunk_of_another_gang_size(tmp_path, demo_dir) -> None:
    """`run_conf.resume_from_checkpoint` naming a sharded chunk of a gang of 2: a new fsdp run on 1 device
    starts from its weights and moments (DCP reshards them), at its own step 0; runs that cannot load it
    are refused before any work, as is a folder that holds no checkpoint."""
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "source")
    common = [*ON_CPU, *FSDP, "--set", "training_args.learning_rate=1e-2", "--set", "training_args.warmup_steps=0"]
    finetune(tmp_path, "run", str(config), *common, *small("source", steps=8, chunks=2), "--set", "experiment.devices_per_run=2")
    source = tmp_path / "runs" / "source"
    (run,) = states(source)
    chunk = source / "runs" / run / "chunk-1"
    assert (chunk / ".metadata").is_file() and not (chunk / "adapter_model.safetensors").exists()
    start = ["--set", f"run_conf.resume_from_checkpoint={chunk}"]
    finetune(tmp_path, "run", str(config), *common, *small("started", steps=4, chunks=2), *start)
    started = tmp_path / "runs" / "started"
    assert set(states(started).values()) == {"completed"}
    assert chunk_rows(started)[-1][1] == 1 and len(logged_losses(started)) == 4, "its own 4 steps, from step 0"
    fresh, trained, first = logged_losses(source)[0], logged_losses(source)[-1], logged_losses(started)[0]
    assert abs(first - trained) < 0.25 * (fresh - trained), (fresh, trained, first)
    ddp = finetune(tmp_path, "run", str(config), *small("ddp", steps=4, chunks=2), *ON_CPU, *start, check=False)
    assert ddp.returncode == 1 and "which a ddp run does not load; start this run with experiment.distributed: fsdp" in ddp.stderr
    nothing = ["--set", f"run_conf.resume_from_checkpoint={demo_dir}"]
    refused = finetune(tmp_path, "run", str(config), *common, *small("nothing", steps=4, chunks=2), *nothing, check=False)
    assert refused.returncode == 1 and "is not a training checkpoint" in refused.stderr, refused.stderr[-2000:]
    other = finetune(tmp_path, "run", str(config), *common, *small("other", steps=4, chunks=2), *start,
                     "--set", "peft_conf.peft_kwargs.r=8", check=False)  # an adapter of another shape: refused, not retried
    assert other.returncode == 1 and "this run has peft_conf.peft_kwargs.r=8: its weights have other shapes" in other.stderr
    assert not (tmp_path / "runs" / "ddp").exists() and not (tmp_path / "runs" / "nothing").exists()
    assert not (tmp_path / "runs" / "other").exists()
