"""A real experiment on the CPU against what breaks control planes: a second controller, bad requests
while it trains, SIGKILL, then resuming a moved folder and a copy of it from another directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import state_db
from tests.test_training import _adapters, _wait_for_chunks, chunk_rows, demo_config, finetune, small, start_experiment, states

pytestmark = pytest.mark.slow

BAD_CLONES = [
    {"set": ["training_args.num_train_epochs=.inf"]},
    {"set": ["data_conf.training_data.datasets.99.path=x"]},
    {"set": ["method.x=y"]},
    {"set": ["batchsize_conf.total_train_batch_size=1000000000000"]},
    {"set": ["run_conf.final_checkpoint_name=../../../x"]},
    {"set": "not a list"},
    ["not", "a", "mapping"],
]


def files_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((root / "runs").rglob("*")) if path.is_file()}


def queue_raw(root: Path, run_id: str, payloads: list) -> None:
    """Requests written straight into the store, past `ctl`'s own checks."""
    with state_db(root) as db:
        db.executemany("INSERT INTO requests (kind, run_id, payload, created_at) VALUES ('clone', ?, ?, ?)",
                       [(run_id, json.dumps(payload), time.time()) for payload in payloads])


def request_statuses(root: Path) -> list[str]:
    with state_db(root) as db:
        return [row[0] for row in db.execute("SELECT status FROM requests ORDER BY id")]


def test_a_second_controller_bad_requests_and_sigkill_leave_a_folder_that_resumes_moved_or_copied(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "robust")
    process = start_experiment(tmp_path, ["run", str(config), *small("robust", steps=16, chunks=4), "--set", "peft_conf.peft_kwargs.r=!list [4]"])
    root = tmp_path / "runs" / "robust"
    _wait_for_chunks(root, 2, process)

    second = finetune(tmp_path, "run", "--resume", str(root), check=False)
    assert second.returncode == 2 and f"pid {process.pid}" in second.stderr and "Traceback" not in second.stderr

    queue_raw(root, sorted(states(root))[0], BAD_CLONES)
    deadline = time.time() + 120
    while "pending" in request_statuses(root) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert all(status.startswith("rejected: ") for status in request_statuses(root)), request_statuses(root)
    assert process.poll() is None or process.returncode == 0, "bad requests never stop the controller"

    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    copy, moved = tmp_path / "copies" / "robust", tmp_path / "moved" / "robust"
    shutil.copytree(root, copy)
    moved.parent.mkdir()
    root.rename(moved)
    original = files_digest(moved)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    finetune(elsewhere, "run", "--resume", str(copy))
    assert files_digest(moved) == original, "resuming a copy never touches the original"
    finetune(moved, "run", "--resume", ".")
    for folder in (copy, moved):
        assert set(states(folder).values()) == {"completed"}
        assert chunk_rows(folder) == sorted({(run, chunk) for run in states(folder) for chunk in range(4)})
        with state_db(folder) as db:
            assert db.execute("SELECT COUNT(*) FROM metrics GROUP BY run_id, name, step HAVING COUNT(*) > 1").fetchall() == []
    assert _adapters(copy) == _adapters(moved), "both resumed to the same weights"
