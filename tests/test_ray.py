"""`experiment.backend: ray`: the same scheduler with workers as Ray actors (a local Ray runtime here)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import time

import pytest

from tests.test_training import _adapters, _wait_for_chunks, chunk_rows, demo_config, finetune, small, start_experiment, states

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'finetune[ray]')")]
RAY = ["--set", "experiment.backend=ray", "--set", "experiment.devices=cpu"]


def test_the_demo_grid_on_ray_matches_the_local_backend_byte_for_byte(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "ray")
    finetune(tmp_path, "run", str(config), *small("on-ray", steps=6, chunks=3), *RAY)
    finetune(tmp_path, "run", str(config), *small("local", steps=6, chunks=3))
    on_ray, local = tmp_path / "runs" / "on-ray", tmp_path / "runs" / "local"
    assert set(states(on_ray).values()) == {"completed"} and len(states(on_ray)) == 4
    assert _adapters(on_ray) == _adapters(local)
    with sqlite3.connect(on_ray / "state.db") as db:
        workers = {json.loads(row[0])["worker"] for row in db.execute("SELECT detail FROM events WHERE kind = 'chunk_started'")}
    assert workers == {"ray-cpu/0"}


def test_an_actor_killed_mid_chunk_loses_only_that_chunk_and_the_sweep_completes(tmp_path, demo_dir) -> None:
    import psutil

    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "ray-kill")
    process = start_experiment(tmp_path, ["run", str(config), *small("kill", steps=40, chunks=4), *RAY])
    root = tmp_path / "runs" / "kill"
    try:
        _wait_for_chunks(root, 2, process, timeout=300)
        deadline = time.time() + 60
        actors = []
        while not actors and time.time() < deadline:
            actors = [p for p in psutil.process_iter(["cmdline"]) if "ray::WorkerActor" in " ".join(p.info["cmdline"] or [])]
            time.sleep(0.2)
        assert actors, "no worker actor process found"
        actors[0].kill()  # as a lost node or the OOM killer would
        assert process.wait(timeout=400) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert set(states(root).values()) == {"completed"}
    assert chunk_rows(root) == sorted((run, chunk) for run in states(root) for chunk in range(4))
    with sqlite3.connect(root / "state.db") as db:
        kinds = [row[0] for row in db.execute("SELECT kind FROM events")]
    assert "chunk_lost" in kinds or kinds.count("chunk_started") > 16
