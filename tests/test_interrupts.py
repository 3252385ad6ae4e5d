"""Issue 31, items 2 and 3 end to end: a plain log outside a terminal, Ctrl-C and SIGTERM stop the
experiment with one line and the resume command, no worker traceback, and a resume says what it picks up."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

import pytest

from tests.test_training import FINETUNE, _wait_for_chunks, demo_config, small

pytestmark = pytest.mark.slow


def test_ctrl_c_then_sigterm_on_the_resume(tmp_path, demo_dir) -> None:
    config = demo_config(tmp_path, demo_dir, "sft-lora-grid.yaml", "intr")
    args = ["run", str(config), *small("intr", steps=24, chunks=4), "--set", "peft_conf.peft_kwargs.r=!list [4]",
            "--set", "training_args.learning_rate=!list [1e-3]"]
    process = subprocess.Popen([*FINETUNE, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    root = tmp_path / "runs" / "intr"
    _wait_for_chunks(root, 1, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert re.search(r"stopped by Ctrl-C \(SIGINT\): \d of 4 chunks saved in .*; resume with: finetune run --resume runs/intr$", line)
    # the plain log (stdout is no terminal): a line per finished chunk
    assert re.search(r"\] [0-9a-f]{10} chunk 1/4: step 6, [\d.]+s, [\d,]+ tokens/s; loss=[\d.]+ eval_loss=[\d.]+", out), out

    resumed = subprocess.Popen([*FINETUNE, "run", "--resume", "runs/intr"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    said = ""
    deadline = time.time() + 120
    while "resuming" not in said and time.time() < deadline and resumed.poll() is None:
        if select.select([resumed.stdout], [], [], 1.0)[0]:
            said += resumed.stdout.readline()
    assert re.search(r"resuming .*intr: \d of 4 chunks saved; continuing 1 run\(s\)", said), said
    resumed.send_signal(signal.SIGTERM)  # as Kubernetes stops a Job's pod: the controller only
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 143, out + err
    assert "Traceback" not in out + err
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert "stopped by SIGTERM" in line and line.endswith("resume with: finetune run --resume runs/intr")
