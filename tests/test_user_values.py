"""User values are shown as written: never read as rich markup or emoji codes, and key paths take ASCII digits only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BASE_SFT
from tests.test_experiment_folder import make_experiment, run_ids

REPO = Path(__file__).resolve().parent.parent
ODD = ["a:x:c", "demo/mod:smile:el", "[red]b[/red]"]


def finetune(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_plan_status_and_requests_show_user_values_as_written(tmp_path) -> None:
    tree = json.loads(json.dumps(BASE_SFT))
    tree["run_conf"]["model"] = {"$list": ODD}  # a string knob: shown in the plan's cells
    (tmp_path / "train.jsonl").write_text((json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n") * 8)
    tree["data_conf"]["training_data"]["datasets"][0]["path"] = str(tmp_path / "train.jsonl")
    (tmp_path / "c:x:.json").write_text(json.dumps(tree))
    for folder in ODD:  # plan checks the models exist before it shows them (a local folder passes)
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    shown = finetune(tmp_path, "plan", "c:x:.json")
    assert all(value in shown.stdout for value in ODD) and "c:x:.json" in shown.stdout, shown.stdout + shown.stderr
    assert "❌" not in shown.stdout + shown.stderr and "😄" not in shown.stdout

    (tmp_path / "e").mkdir()
    root = make_experiment(tmp_path / "e")
    import sqlite3

    from finetune.schedule.store import StateStore

    with sqlite3.connect(root / "state.db") as db:
        for run_id, label in zip(run_ids(root), ["a:x:c [red]b[/red]", "demo/mod:smile:el"]):
            db.execute("UPDATE runs SET label = ? WHERE run_id = ?", (label, run_id))
    store = StateStore(root / "state.db")
    store.request("clone", run_ids(root)[0], {"set": ["training_args.optim=a:x:c"]})
    store.close()
    status = finetune(tmp_path, "status", str(root))
    requests = finetune(tmp_path, "ctl", "requests", str(root))
    assert "a:x:c [red]b[/red]" in status.stdout and "demo/mod:smile:el" in status.stdout, status.stdout
    assert "training_args.optim=a:x:c" in requests.stdout, requests.stdout
    assert not any(emoji in status.stdout + requests.stdout for emoji in "❌😄")


@pytest.mark.parametrize("key", ["training_args.٣", "peft_conf.peft_kwargs.target_modules.١", "a.²"])
def test_a_key_path_takes_ascii_digits_only(key) -> None:
    from finetune.config.loading import ConfigLoadError, parse_override

    with pytest.raises(ConfigLoadError, match="ASCII digits"):
        parse_override(f"{key}=1")
    assert parse_override("peft_conf.peft_kwargs.target_modules.1=v_proj")[0][-1] == 1
