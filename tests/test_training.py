"""Real training on the CPU with the demo model: sweeps, methods, tracking, chunk equivalence, crash-resume, control."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES
from tests.helpers import state_db

pytestmark = pytest.mark.slow
FINETUNE = [sys.executable, "-m", "finetune.cli"]


def demo_config(tmp_path: Path, demo_dir: Path, example: str, name: str) -> Path:
    text = (EXAMPLES / example).read_text().replace("demo/", f"{demo_dir}/")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def finetune(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*FINETUNE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def small(name: str, steps: int = 8, chunks: int = 4) -> list[str]:
    return ["--set", f"experiment.name={name}", "--set", f"training_args.max_steps={steps}", "--set", f"experiment.num_chunks={chunks}"]


def chunk_rows(root: Path) -> list[tuple[str, int]]:
    with state_db(root) as db:
        return db.execute("SELECT run_id, chunk FROM chunks ORDER BY run_id, chunk").fetchall()


def states(root: Path) -> dict[str, str]:
    with state_db(root) as db:
        return dict(db.execute("SELECT run_id, state FROM runs").fetchall())


def generate_from(final: Path) -> str:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    loader = AutoPeftModelForCausalLM if (final / "adapter_config.json").is_file() else AutoModelForCausalLM
    model = loader.from_pretrained(final)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 plus 2?"}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    return tokenizer.decode(output[0])


@pytest.fixture(scope="module")
def grid(tmp_path_factory, demo_dir) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The demo grid (4 LoRA runs, 4 chunks of one step each), trained once and read by the tests below
    that only read an experiment: (its folder, the `finetune run` result)."""
    tmp_path = tmp_path_factory.mktemp("grid")
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "grid")
    result = finetune(tmp_path, "run", str(config), *small("grid", steps=4, chunks=4))
    return tmp_path / "runs" / "grid", result


def test_sweep_trains_every_run_and_tracks_in_mlflow(grid) -> None:
    root, result = grid
    assert "Ranked by eval_loss" in result.stdout
    assert set(states(root).values()) == {"completed"} and len(states(root)) == 4
    assert len(chunk_rows(root)) == 16
    finals = sorted(root.glob("runs/*/checkpoint-final"))
    assert len(finals) == 4
    generate_from(finals[0])
    assert (finals[0].parent / "checkpoint-new-basemodel" / "config.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grid")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("finetune.role") == "experiment"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    child = children[0]
    assert "knob.peft_conf.peft_kwargs.r" in child.data.params and "config.training_args.learning_rate" in child.data.params
    assert {"loss", "eval_loss"} <= set(child.data.metrics)
    assert len(client.get_metric_history(child.info.run_id, "eval_loss")) == 4


def test_report_and_status_of_a_finished_sweep(grid, tmp_path) -> None:
    root, _ = grid
    finetune(tmp_path, "report", str(root))
    assert (root / "report.md").is_file() and (root / "loss.png").is_file() and (root / "eval_loss.png").is_file()
    status = finetune(tmp_path, "status", str(root))
    assert "4/4" in status.stdout and "completed" in status.stdout


@pytest.mark.parametrize(
    "example,extra",
    [
        ("sft-lora-grid.yaml", ["--set", "peft_conf={peft_type: NO_PEFT}", "--set", "training_args.learning_rate=1e-3",
                                "--set", "tracking={mlflow_server_uri: sqlite:///tracked.db, experiment_name: tracked, hf_mlflow_log_artifacts: 'True'}"]),
        ("dpo.yaml", ["--set", "training_args.beta=0.1"]),
        ("grpo.yaml", []),
    ],
    ids=["full-sft", "dpo", "grpo"],
)
def test_each_method_trains_and_its_checkpoint_generates(tmp_path, demo_dir, example, extra) -> None:
    config = demo_config(tmp_path, demo_dir, example, "method")
    finetune(tmp_path, "run", str(config), *small("method", steps=2, chunks=2), *extra)
    finals = sorted((tmp_path / "runs" / "method").glob("runs/*/checkpoint-final"))
    assert finals
    generate_from(finals[0])
    if any("tracking=" in item for item in extra):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'tracked.db'}")
        runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
        child = next(run for run in runs if "mlflow.parentRunId" in run.data.tags)
        assert [item.path for item in client.list_artifacts(child.info.run_id)] == ["checkpoint-final"]


def test_quantization_without_cuda_is_a_clear_error(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "quant")
    result = finetune(tmp_path, "run", str(config), "--set", "quant_conf={quantization_type: bits-and-bytes, load_in_4bit: true}", check=False)
    assert result.returncode == 1
    assert "needs a CUDA device" in result.stderr
    assert not (tmp_path / "runs" / "sft-lora-grid" / "state.db").exists()


def _final_weights(root: Path, run_id: str) -> dict:
    from safetensors.torch import load_file

    final = root / "runs" / run_id / "checkpoint-final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(final / name)


def _bench(root: Path, cpu_budget_bytes: int | None = None):
    from finetune.train.residency import Budgets
    from finetune.train.workbench import Workbench

    root.mkdir(parents=True, exist_ok=True)
    return Workbench(root, "cpu", Budgets(0, cpu_budget_bytes if cpu_budget_bytes is not None else 1 << 40))


@pytest.mark.parametrize(
    "example,overrides",
    [
        ("sft-lora-grid.yaml", ["peft_conf.peft_kwargs.lora_dropout=0.1"]),
        ("sft-lora-grid.yaml", ["peft_conf={peft_type: NO_PEFT}", "training_args.learning_rate=!list [1e-4, 3e-4]"]),
        ("dpo.yaml", ["peft_conf.peft_kwargs.lora_dropout=0.1"]),
        ("sft-lora-grid.yaml", ["sft_args.packing=true"]),
    ],
    ids=["lora", "full", "dpo", "packed"],
)
def test_chunked_interleaved_training_is_bitwise_identical_to_straight_through(tmp_path, demo_dir, example, overrides) -> None:
    """A run trained in 4 chunks, its turns interleaved with other runs' on one worker, and also one
    resumed from disk at every boundary (no memory to keep runs resident), ends with exactly the
    weights of the same run trained in one go."""
    import torch

    from finetune.config.loading import load_document
    from finetune.config.validation import CONFIG_ADAPTER
    from finetune.plan.build import build_plan

    config = demo_config(tmp_path, demo_dir, example, "eq")
    plan = build_plan(load_document(config, overrides=[*overrides, "training_args.max_steps=12"]))
    run, *others = plan.runs[:3]

    def chunked(planned, steps: list[int]):
        copy = planned.model_copy(deep=True)
        copy.derived.chunk_steps = steps
        return copy, CONFIG_ADAPTER.validate_python(copy.config)

    def train(directory: str, steps: list[int], interleave: bool, cpu_budget: int | None = None) -> dict:
        root = tmp_path / directory
        bench = _bench(root, cpu_budget)
        target, target_config = chunked(run, steps)
        rivals = [chunked(other, [3, 3, 3, 3]) for other in (others if interleave else [])]
        resume: dict[str, str | None] = {}
        for chunk in range(len(steps)):
            for planned, planned_config in [(target, target_config), *rivals]:
                outcome = bench.train_chunk(planned, planned_config, chunk, resume.get(planned.run_id), 8)
                resume[planned.run_id] = outcome.checkpoint
                bench.writer.wait_for()
        bench.writer.close()
        return _final_weights(root, run.run_id)

    straight = train("straight", [12], interleave=False)
    interleaved = train("interleaved", [3, 3, 3, 3], interleave=True)
    from_disk = train("from-disk", [3, 3, 3, 3], interleave=True, cpu_budget=0)
    assert straight.keys() == interleaved.keys() == from_disk.keys()
    assert all(torch.equal(straight[key], interleaved[key]) for key in straight)
    assert all(torch.equal(straight[key], from_disk[key]) for key in straight)


def test_lora_checkpoints_hold_the_adapter_new_token_rows_and_moments_only(grid, demo_dir) -> None:
    """The chat template adds tokens: a chunk checkpoint holds the adapter, the new rows (not the
    whole embedding) and their optimizer moments; the grown base is written once per experiment."""
    import torch
    from safetensors.torch import load_file

    root, _ = grid
    model = json.loads((demo_dir / "model" / "config.json").read_text())
    for run_dir in sorted((root / "runs").iterdir()):
        (chunk,) = run_dir.glob("chunk-*")  # the last durable chunk (earlier ones are pruned)
        adapter = load_file(chunk / "adapter_model.safetensors")
        assert any("trainable_tokens_delta" in name for name in adapter)
        assert all(tensor.shape[0] < model["vocab_size"] for tensor in adapter.values()), "a whole embedding was saved"
        trained = sum(tensor.numel() for tensor in adapter.values())
        moments = torch.load(chunk / "optimizer.pt", weights_only=False)["state"]
        assert sum(value.numel() for state in moments.values() for value in state.values() if value.dim()) == 2 * trained
        assert sorted(path.name for path in chunk.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "state.pt"]
        assert (run_dir / "checkpoint-new-basemodel").resolve().parent == (root / "base-models").resolve()
    assert len(list((root / "base-models").iterdir())) == 1


def test_export_merges_an_adapter_into_its_base(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "export")
    finetune(tmp_path, "run", str(config), *small("export", steps=4, chunks=2), "--set", "peft_conf.peft_kwargs.r=!list [4]",
             "--set", "training_args.learning_rate=!list [1e-3]")
    root = tmp_path / "runs" / "export"
    (run_id,) = states(root)
    assert not (root / "runs" / run_id / "checkpoint-merged").exists()
    result = finetune(tmp_path, "export", str(root), run_id, "--merged")
    merged = root / "runs" / run_id / "checkpoint-merged"
    assert str(merged) in result.stdout
    assert not (merged / "adapter_config.json").exists() and (merged / "config.json").is_file()
    generate_from(merged)


def start_experiment(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    """`finetune run` in the background, in its own process group (so that it can be killed whole)."""
    return subprocess.Popen([*FINETUNE, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for_chunks(root: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (root / "state.db").is_file():
            try:
                if len(chunk_rows(root)) >= count:
                    return
            except sqlite3.OperationalError:
                pass
        assert process.poll() is None, "the experiment ended before it could be interrupted"
        time.sleep(0.05)  # often enough that a fast experiment is caught near the chunk waited for
    raise AssertionError("timed out waiting for chunks")


def _adapters(root: Path, tensors: bool = False) -> dict[str, dict[str, Any]]:
    """Final adapter weights by run label (run ids differ between experiments of other names): as lists, to
    compare bit for bit, or as `tensors`."""
    from safetensors.torch import load_file

    with state_db(root) as db:
        labels = dict(db.execute("SELECT run_id, label FROM runs").fetchall())
    return {labels[final.parent.name]: {key: value if tensors else value.tolist()
                                        for key, value in load_file(final / "adapter_model.safetensors").items()}
            for final in sorted(root.glob("runs/*/checkpoint-final"))}


def test_sigkill_of_the_controller_then_resume_loses_and_repeats_nothing(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "crash")
    args = ["run", str(config), *small("crash", steps=16, chunks=4), "--set", "peft_conf.peft_kwargs.r=!list [4]"]
    process = start_experiment(tmp_path, args)
    root = tmp_path / "runs" / "crash"
    _wait_for_chunks(root, 3, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = chunk_rows(root)
    assert 3 <= len(before) < 8
    finetune(tmp_path, "run", "--resume", str(root))
    after = chunk_rows(root)
    assert after == sorted({(run, chunk) for run in states(root) for chunk in range(4)})
    assert set(before) <= set(after)
    assert set(states(root).values()) == {"completed"}

    finetune(tmp_path, *[arg if arg != "experiment.name=crash" else "experiment.name=straight" for arg in args])
    assert _adapters(root) == _adapters(tmp_path / "runs" / "straight")


def test_interactive_control_on_a_live_experiment(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "ctl")
    args = ["run", str(config), *small("ctl", steps=60, chunks=6), "--set", "training_args.learning_rate=!list [1e-3]"]
    process = start_experiment(tmp_path, args)
    root = tmp_path / "runs" / "ctl"
    _wait_for_chunks(root, 2, process)  # fewest chunks first: both runs have a durable chunk
    first, second = sorted(states(root))
    finetune(tmp_path, "ctl", "stop", str(root), first)
    finetune(tmp_path, "ctl", "clone", str(root), second, "--set", "training_args.learning_rate=0.002", "--warm-start")
    assert process.wait(timeout=300) == 0
    after = states(root)
    assert after[first] == "stopped"
    clones = [run for run in after if run not in (first, second)]
    assert len(clones) == 1 and after[clones[0]] == "completed"
    with state_db(root) as db:
        parent = db.execute("SELECT parent_run_id FROM runs WHERE run_id = ?", (clones[0],)).fetchone()[0]
        kinds = [row[0] for row in db.execute("SELECT kind FROM events")]
    assert parent == second and "ctl_stop" in kinds and "ctl_clone" in kinds

    finetune(tmp_path, "ctl", "resume", str(root), first)
    finetune(tmp_path, "ctl", "delete", str(root), clones[0])
    finetune(tmp_path, "run", "--resume", str(root))
    final = states(root)
    assert final[first] == "completed" and final[clones[0]] == "deleted"
    assert not (root / "runs" / clones[0]).exists()


def test_successive_halving_records_its_decisions(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-successive-halving.yaml", "sha")
    finetune(tmp_path, "run", str(config), *small("sha", steps=8, chunks=4), "--set", "sweep.num_runs=4")
    root = tmp_path / "runs" / "sha"
    with state_db(root) as db:
        decisions = db.execute("SELECT run_id, kind, detail FROM events WHERE kind LIKE 'sha_%'").fetchall()
        chunks_per_run = dict(db.execute("SELECT run_id, COUNT(*) FROM chunks GROUP BY run_id").fetchall())
    assert decisions, "no rung decision was recorded"
    assert {kind for _, kind, _ in decisions} <= {"sha_continue", "sha_stop"}
    assert all('"metric": "eval_loss"' in detail and '"cutoff"' in detail for _, _, detail in decisions)
    final = states(root)
    for run_id, state in final.items():
        stopped_here = any(run == run_id and kind == "sha_stop" for run, kind, _ in decisions)
        assert (state == "stopped") == stopped_here
        assert state == "stopped" or chunks_per_run[run_id] == 4
    assert "sha_" in finetune(tmp_path, "report", str(root)).stdout


def test_problems_known_before_training_are_all_reported_at_once_and_nothing_starts(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "preflight")
    result = finetune(tmp_path, "run", str(config), *small("preflight"), "--set", "peft_conf.peft_kwargs.r=!list [4]",
                      "--set", f"run_conf.model=!list [{demo_dir}/model, {tmp_path}/no-such-model]",
                      "--set", "run_conf.model_args.attn_implementation=flash_attention_2",
                      "--set", "data_conf.chat_template_name=keep-original", check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()  # each problem once, with the runs it concerns
    (model,) = [line for line in lines if line.startswith("run_conf.model: ") and "no-such-model does not exist" in line]
    (attention,) = [line for line in lines if "attn_implementation: flash_attention_2 needs the flash_attn package" in line]
    (template,) = [line for line in lines if "keep-original, but the tokenizer" in line]
    assert model.count("run ") == 2 and template.count("run ") == 2
    assert attention.endswith("(every run)")
    assert not (tmp_path / "runs" / "preflight").exists()


def test_a_run_that_cannot_start_fails_alone(tmp_path, demo_dir) -> None:
    """A model whose tokenizer loads but whose weights do not is only found when loading: that run fails,
    the others train. (A folder whose tokenizer does not load is refused before any work.)"""
    import shutil

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "alone")
    missing = Path(shutil.copytree(demo_dir / "model", tmp_path / "no-such-model"))
    for weights in missing.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    result = subprocess.run(
        [*FINETUNE, "run", str(config), *small("alone", steps=4, chunks=2),
         "--set", "peft_conf.peft_kwargs.r=!list [4]", "--set", "training_args.learning_rate=!list [1e-3]",
         "--set", f"run_conf.model=!list [{demo_dir}/model, {missing}]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    final = states(tmp_path / "runs" / "alone")
    assert sorted(final.values()) == ["completed", "failed"]
    assert "failed: SafetensorError" in result.stderr


def test_a_worker_killed_mid_experiment_loses_one_chunk_and_the_sweep_completes(tmp_path, demo_dir) -> None:
    """The chunk the worker was training is tried again on a new worker; the runs it held in
    memory continue from their last durable chunks; every run completes."""
    import psutil

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "oom")
    process = start_experiment(tmp_path, ["run", str(config), *small("oom", steps=40, chunks=4)])
    root = tmp_path / "runs" / "oom"
    _wait_for_chunks(root, 2, process)
    workers = [child for child in psutil.Process(process.pid).children(recursive=True) if "spawn" in " ".join(child.cmdline())]
    assert workers, "no worker process found"
    workers[0].kill()  # as the kernel's OOM killer would
    assert process.wait(timeout=300) == 0
    assert set(states(root).values()) == {"completed"}
    assert chunk_rows(root) == sorted((run, chunk) for run in states(root) for chunk in range(4))
    with state_db(root) as db:
        lost = [json.loads(row[0]) for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_lost'")]
    assert all("died" in event["error"] and event["retry"] == 1 for event in lost)
