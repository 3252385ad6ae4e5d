"""The committed TRL/PEFT snapshots match the installed packages (regenerate: make snapshot)."""

from __future__ import annotations

import json

from finetune.config.snapshot import PEFT_SNAPSHOT, TRL_SNAPSHOT, build_peft_snapshot, build_trl_snapshot


def test_trl_snapshot_matches_installed_trl() -> None:
    committed = json.loads(TRL_SNAPSHOT.read_text())
    assert committed == json.loads(json.dumps(build_trl_snapshot())), "TRL changed: run `make snapshot docs`"


def test_peft_snapshot_matches_installed_peft() -> None:
    committed = json.loads(PEFT_SNAPSHOT.read_text())
    assert committed == json.loads(json.dumps(build_peft_snapshot())), "PEFT changed: run `make snapshot docs`"


def test_light_commands_do_not_import_the_ml_stack() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from finetune.cli import app; from finetune.plan.build import build_plan; "
        "from finetune.config.schema import sweep_schema; "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'mlflow', 'datasets') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == ""
