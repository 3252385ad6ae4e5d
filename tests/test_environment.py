"""Faults of the environment end cleanly (issue 30): a state store locked by another process, a full disk, a
read-only folder, a folder moved while it trains. Each is one line that says what to do, never a traceback,
and never a failed run."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.schedule.messages import RunFailed, WriteFailed
from finetune.schedule.store import EnvironmentFault, StateStore
from tests.test_controller import done, make_controller, planned, send, status, ticket
from tests.test_experiment_folder import make_experiment, run_ids

REPO = Path(__file__).resolve().parent.parent


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"})


def mounted(path: Path, size: str, read_only: bool = False) -> bool:
    """A tmpfs of `size` at `path` (root only); False where this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    options = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not mounted(disk, "1m"):
        pytest.skip("needs root to mount a small tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def read_only_experiment(tmp_path):
    """An experiment of two runs with a durable chunk each, in a folder this process cannot write."""
    root = make_experiment(tmp_path)
    final = root / "runs" / run_ids(root)[0] / "checkpoint-final"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    if os.geteuid() != 0:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        yield root
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        return
    place = tmp_path / "archive"
    if not mounted(place, "16m"):
        pytest.skip("cannot make a read-only folder here")
    shutil.copytree(root, place / "exp")
    subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)
    yield place / "exp"
    subprocess.run(["umount", "-l", str(place)], check=False)


# ---------------------------------------------------------------- a state store locked by another process


def hold_exclusive(path: Path, seconds: float) -> subprocess.Popen:
    script = ("import sqlite3, sys, time\ndb = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "db.execute('BEGIN EXCLUSIVE')\nprint('held', flush=True)\ntime.sleep(float(sys.argv[2]))\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_store_locked_for_a_while_is_waited_for(tmp_path) -> None:
    StateStore(tmp_path / "state.db").close()
    holder = hold_exclusive(tmp_path / "state.db", 2)
    store = StateStore(tmp_path / "state.db", busy_timeout_s=0.2, busy_patience_s=30)
    store.add_run("a", "a", 2)  # waits for the holder, beyond SQLite's own busy timeout
    assert store.run("a").state == "pending"
    store.close()
    holder.wait()


def test_a_store_locked_for_too_long_names_the_holder(tmp_path) -> None:
    StateStore(tmp_path / "state.db").close()
    holder = hold_exclusive(tmp_path / "state.db", 30)
    try:
        store = StateStore(tmp_path / "state.db", busy_timeout_s=0.1, busy_patience_s=1)
        with pytest.raises(EnvironmentFault, match=rf"state.db has been locked by pid {holder.pid} \(.*python.*\) for"):
            store.add_run("a", "a", 2)
        store.close()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- a full disk


def fill(disk: Path) -> None:
    """Write to `disk` until it has no room left."""
    with open(disk / "filler", "ab", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass


def test_a_full_disk_is_said_with_the_folder_and_its_free_space(small_disk) -> None:
    store = StateStore(small_disk / "state.db")
    fill(small_disk)
    with pytest.raises(EnvironmentFault, match=rf"the disk of {small_disk} is full \(0.0 MB free\)"):
        for index in range(1000):
            store.log_metrics("a", index, {f"m{n}": float(n) for n in range(50)})
    store.close()


def test_a_closed_store_on_a_full_disk_opens_to_say_the_disk_is_full(small_disk) -> None:
    """SQLite fails to make a WAL store's shared-memory index on a full disk with "disk I/O error", not
    SQLITE_FULL: `finetune status` (or the report after a run) must still say the disk is full."""
    store = StateStore(small_disk / "state.db")
    store.add_run("a", "a", 2)
    store.close()
    assert not (small_disk / "state.db-shm").exists()
    fill(small_disk)
    with pytest.raises(EnvironmentFault, match=rf"the disk of {small_disk} is full \(0.0 MB free\)"):
        StateStore(small_disk / "state.db", create=False)
    (small_disk / "filler").unlink()
    reopened = StateStore(small_disk / "state.db", create=False)
    assert [row.run_id for row in reopened.runs()] == ["a"]
    reopened.close()


def test_an_io_error_on_a_disk_with_room_is_not_called_full(tmp_path) -> None:
    from finetune.schedule.faults import full_disk_io_error

    assert not full_disk_io_error(sqlite3.OperationalError("disk I/O error"), tmp_path)


@pytest.mark.parametrize("message", ["WriteFailed", "RunFailed"])
def test_a_worker_that_finds_the_disk_full_stops_the_experiment_not_the_run(tmp_path, message) -> None:
    controller, pool, _ = make_controller(tmp_path, [planned("a", chunks=3)])
    worker = pool.workers[0]
    controller.step()
    error = "OSError: [Errno 28] No space left on device: 'runs/a/.chunk-0.tmp-1-2/optimizer.pt'"
    if message == "WriteFailed":
        send(controller, pool, done(controller, worker.worker_id, "a", 0))
        failure = WriteFailed(worker.worker_id, "a", 0, error, ticket(controller, "a", 0))
    else:  # the chunk being trained: a sharded checkpoint written by the worker itself, say
        failure = RunFailed(worker.worker_id, "a", error, "", ticket(controller, "a", 0))
    with pytest.raises(EnvironmentFault, match=f"the disk of {tmp_path} is full .* every durable chunk is kept"):
        send(controller, pool, failure)
    assert status(controller, "a") != "failed"


@pytest.mark.parametrize("free", [0, 2**30])
def test_a_worker_sqlite_io_error_is_a_full_disk_only_when_the_disk_has_no_room(tmp_path, monkeypatch, free) -> None:
    """SQLite says "disk I/O error" where a full disk keeps it from growing a file: with no room left, that
    stops the experiment as a full disk; with room, it is the run's own error and the run fails."""
    from types import SimpleNamespace

    import finetune.schedule.faults as faults

    controller, pool, _ = make_controller(tmp_path, [planned("a", chunks=3)])
    worker = pool.workers[0]
    controller.step()
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda path: SimpleNamespace(total=2**31, used=2**31 - free, free=free))
    failure = RunFailed(worker.worker_id, "a", "sqlite3.OperationalError: disk I/O error", "", ticket(controller, "a", 0))
    if free:
        send(controller, pool, failure)
        assert status(controller, "a") == "failed"
    else:
        with pytest.raises(EnvironmentFault, match=f"the disk of {tmp_path} is full"):
            send(controller, pool, failure)
        assert status(controller, "a") != "failed"


def test_resuming_removes_what_a_stopped_write_left_half_written(tmp_path) -> None:
    StateStore(tmp_path / "state.db").close()
    leftovers = [tmp_path / "runs" / "a" / ".chunk-1.tmp-123-456", tmp_path / "runs" / "a" / ".checkpoint-final.tmp-9"]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
        (leftover / "optimizer.pt").write_bytes(b"half")
    kept = tmp_path / "runs" / "a" / "chunk-0"
    kept.mkdir()
    controller, _, _ = make_controller(tmp_path, [planned("a")])
    assert not any(leftover.exists() for leftover in leftovers) and kept.is_dir()
    assert [event["path"] for event in controller.store.events() if event["kind"] == "leftover_removed"] == [
        "runs/a/.checkpoint-final.tmp-9", "runs/a/.chunk-1.tmp-123-456"]


def test_a_chunk_whose_write_fails_leaves_no_temporary_directory(tmp_path, monkeypatch) -> None:
    import errno

    import torch

    from finetune.train.checkpoint import write_run_state
    from finetune.train.data_order import DataPosition
    from finetune.train.session import RunState

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    (tmp_path / "exp").mkdir()
    target = tmp_path / "exp" / "runs" / "a" / "chunk-0"
    state = RunState(trainable={"w": torch.zeros(2)}, optimizer={}, scheduler={}, step=1, position=DataPosition(0, 1),
                     rng={}, counters={})
    with pytest.raises(OSError, match="No space left"):
        write_run_state(target, state, None)
    assert list(target.parent.iterdir()) == []


# ---------------------------------------------------------------- a folder moved while it trains


def test_a_folder_moved_while_it_trains_stops_the_controller_with_the_new_place(tmp_path) -> None:
    root = tmp_path / "exp"
    controller, pool, _ = make_controller(root, [planned("a")])
    controller.step()
    moved = tmp_path / "moved"
    root.rename(moved)
    with pytest.raises(EnvironmentFault, match=rf"was moved to {moved} while it trained.*finetune run --resume {moved}"):
        controller.step()
    assert not root.exists()


def test_a_chunk_written_after_its_folder_moved_does_not_recreate_the_old_path(tmp_path) -> None:
    import torch

    from finetune.train.checkpoint import write_run_state
    from finetune.train.data_order import DataPosition
    from finetune.train.session import RunState

    root = tmp_path / "exp"
    root.mkdir()
    root.rename(tmp_path / "moved")
    state = RunState(trainable={"w": torch.zeros(2)}, optimizer={}, scheduler={}, step=1, position=DataPosition(0, 1),
                     rng={}, counters={})
    with pytest.raises(FileNotFoundError, match="is gone"):
        write_run_state(root / "runs" / "a" / "chunk-0", state, None)
    assert not root.exists()


def test_a_library_that_makes_its_output_dir_after_the_folder_moved_leaves_no_ghost(tmp_path) -> None:
    """The Trainer makes its output_dir (runs/<run>) as it is built; a worker opening a run while the experiment
    folder moves removes what that recreated at the old path, and only that."""
    from finetune.io import identity, mkdir_under, remove_ghost

    root = tmp_path / "exp"
    root.mkdir()
    known = identity(root)
    run_dir = mkdir_under(root, root / "runs" / "a")
    remove_ghost(root, known, run_dir)  # not moved: kept
    assert run_dir.is_dir()
    root.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="is gone"):
        mkdir_under(root, root / "runs" / "b")
    os.makedirs(run_dir / "completions")  # what the Trainer (and GRPO's) does with its output_dir
    remove_ghost(root, known, run_dir)
    assert not root.exists() and (tmp_path / "moved" / "runs" / "a").is_dir()
    os.makedirs(run_dir)
    (root / "runs" / "user-file").write_text("not ours")
    remove_ghost(root, known, run_dir)
    assert (root / "runs" / "user-file").is_file() and not run_dir.exists()


# ---------------------------------------------------------------- a read-only folder


def test_every_read_command_works_on_a_read_only_folder_and_writers_say_it_is_read_only(read_only_experiment, tmp_path) -> None:
    root = read_only_experiment
    run = run_ids(root)[0]
    status_ = cli(tmp_path, "status", str(root))
    assert status_.returncode == 0 and run in status_.stdout, status_.stderr
    report = cli(tmp_path, "report", str(root))
    assert report.returncode == 0 and run in report.stdout and "read-only" in report.stderr, report.stderr
    elsewhere = cli(tmp_path, "report", str(root), "--output", str(tmp_path / "out"))
    assert elsewhere.returncode == 0 and (tmp_path / "out" / "report.md").is_file(), elsewhere.stderr
    requests = cli(tmp_path, "ctl", "requests", str(root))
    assert requests.returncode == 0, requests.stderr
    for args, says in [(["ctl", "clone", str(root), run, "--set", "training_args.learning_rate=0.01"], "is read-only"),
                       (["ctl", "stop", str(root), run], "is read-only"),
                       (["export", str(root), run, "--merged"], "checkpoint-merged cannot be written"),
                       (["run", "--resume", str(root)], "is read-only: training (`finetune run --resume`)")]:
        result = cli(tmp_path, *args)
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert "remove it" not in result.stderr


@pytest.mark.slow
def test_a_folder_moved_while_it_trains_ends_the_run_command_with_the_new_place_and_no_ghost(tmp_path, demo_dir) -> None:
    """A real experiment renamed after its first durable chunk: `finetune run` exits 2 with the resume command
    for the new place, and nothing is created again at the old path."""
    import time

    import yaml

    from tests.test_training import FINETUNE, _wait_for_chunks

    tree = {
        "method": "sft",
        "experiment": {"name": "moving", "num_chunks": 8},
        "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": f"{demo_dir}/data/sft_train.jsonl"}]},
                      "validation_data": {"type": "NONE"}, "chat_template_name": "chat-ml"},
        "training_args": {"learning_rate": 1e-3, "max_steps": 16, "logging_steps": 1},
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}},
        "run_conf": {"model": f"{demo_dir}/model", "model_args": {"dtype": "float32"}},
        "eval_conf": {"metrics": ["eval_loss"]},
    }
    (tmp_path / "moving.yaml").write_text(yaml.safe_dump(tree))
    process = subprocess.Popen([*FINETUNE, "run", "moving.yaml"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    root, moved = tmp_path / "runs" / "moving", tmp_path / "moved"
    try:
        _wait_for_chunks(root, 1, process)
        os.killpg(process.pid, signal.SIGSTOP)  # moved while the experiment is mid-way, never after it ended
        root.rename(moved)
        os.killpg(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    time.sleep(1)  # a worker that outlived its controller would have written by now
    assert process.returncode == 2, stderr[-3000:]
    assert f"was moved to {moved}" in stderr and f"finetune run --resume {moved}" in stderr
    # finetune's own last word is the one line (MLflow may log its store's failure, traceback included, before it)
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr.split("error:")[-1] and f"finetune run --resume {moved}" in stderr.split("error:")[-1], last
    assert not root.exists(), sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_mlflow_logs_neither_info_nor_the_store_failures_that_finetune_says_in_one_line() -> None:
    """Its store logs a failed write with a traceback before raising it (a full disk, a moved folder); finetune
    says those itself. Checked in a fresh interpreter: MLflow sets its loggers' levels as it is imported."""
    import sys

    code = ("import logging; from finetune.runtime import quiet_libraries; quiet_libraries(); import mlflow; "
            "print(logging.getLogger('mlflow').getEffectiveLevel(), logging.getLogger('mlflow.store.db.utils').isEnabledFor(logging.ERROR))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={key: value for key, value in os.environ.items() if key != "MLFLOW_LOGGING_LEVEL"})
    assert result.stdout.split() == [str(logging.ERROR), "False"], result.stderr[-2000:]


@pytest.mark.slow
def test_a_disk_that_fills_while_it_trains_stops_the_experiment_and_resume_finishes_it(small_disk, tmp_path, demo_dir) -> None:
    """A real experiment on a small tmpfs, filled after its first durable chunk: `finetune run` exits 2 naming
    the folder and its free space, no run failed; once there is room, `--resume` finishes every chunk and no
    half-written directory is left."""
    import sqlite3

    import yaml

    from tests.test_training import FINETUNE, _wait_for_chunks, chunk_rows, finetune

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    tree = {
        "method": "sft",
        "experiment": {"name": "full", "output_dir": str(small_disk), "num_chunks": 8},
        "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": f"{demo_dir}/data/sft_train.jsonl"}]},
                      "validation_data": {"type": "NONE"}, "chat_template_name": "chat-ml"},
        "training_args": {"learning_rate": 1e-3, "max_steps": 32, "logging_steps": 1},
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}},
        "run_conf": {"model": f"{demo_dir}/model", "model_args": {"dtype": "float32"}},
        "eval_conf": {"metrics": ["eval_loss"]},
    }
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(tree))
    process = subprocess.Popen([*FINETUNE, "run", "full.yaml"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    root = small_disk / "full"
    try:
        _wait_for_chunks(root, 1, process)
        os.killpg(process.pid, signal.SIGSTOP)  # the controller and its workers wait while the disk fills
        assert len(chunk_rows(root)) < 8, "the experiment finished before the disk could be filled"
        fill(small_disk)
        os.killpg(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert process.returncode == 2, stderr[-3000:]
    assert f"the disk of {root} is full" in stderr and "Traceback" not in stderr, stderr[-3000:]
    with sqlite3.connect(root / "state.db") as db:
        assert db.execute("SELECT state FROM runs").fetchall() != [("failed",)]
    (small_disk / "filler").unlink()
    finetune(tmp_path, "run", "--resume", str(root))
    with sqlite3.connect(root / "state.db") as db:
        assert db.execute("SELECT state FROM runs").fetchall() == [("completed",)]
        assert db.execute("SELECT COUNT(*) FROM chunks").fetchone() == (8,)
    assert not list(root.glob("runs/*/.*.tmp-*"))
