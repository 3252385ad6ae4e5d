"""The committed TRL/PEFT snapshots agree with the installed packages on what validation depends on.

Names, kinds, choices and defaults decide which keys validate; help texts only feed the generated
docs, so prose reworded upstream is not a failure (it was one: transformers 5.25 reworded
`use_cache`'s help and every fresh clone's `make test` failed). Regenerate with `make snapshot docs`.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

from finetune.config.snapshot import (
    PEFT_SNAPSHOT,
    TRL_SNAPSHOT,
    build_peft_snapshot,
    build_trl_snapshot,
    validation_drift,
    version_note,
)


def _check(committed_path, build) -> None:
    committed = json.loads(committed_path.read_text())
    installed = json.loads(json.dumps(build()))
    note = version_note(committed, installed)
    if note:
        warnings.warn(note, stacklevel=2)
    drift = validation_drift(committed, installed)
    header = note or "the installed packages validate differently from the snapshot; refresh with `make snapshot docs`"
    assert not drift, header + ":\n  " + "\n  ".join(drift[:40])


def test_trl_snapshot_matches_installed_trl() -> None:
    _check(TRL_SNAPSHOT, build_trl_snapshot)


def test_peft_snapshot_matches_installed_peft() -> None:
    _check(PEFT_SNAPSHOT, build_peft_snapshot)


def _sample() -> dict:
    return json.loads(TRL_SNAPSHOT.read_text())


def test_reworded_help_is_not_drift() -> None:
    committed = _sample()
    installed = copy.deepcopy(committed)
    fields = installed["methods"]["sft"]["fields"]
    name = next(key for key, entry in fields.items() if "help" in entry)
    fields[name]["help"] = "reworded upstream"
    assert validation_drift(committed, installed) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: f.pop("learning_rate"), "sft.learning_rate: removed"),
        (lambda f: f.__setitem__("brand_new_key", {"kinds": ["boolean"], "choices": []}), "sft.brand_new_key: added"),
        (lambda f: f["learning_rate"].__setitem__("default", 1.0), "sft.learning_rate.default"),
        (lambda f: f["learning_rate"].__setitem__("kinds", ["string"]), "sft.learning_rate.kinds"),
        (lambda f: f["lr_scheduler_type"]["choices"].append("new_schedule"), "sft.lr_scheduler_type.choices"),
    ],
)
def test_what_validation_reads_is_drift(change, expected: str) -> None:
    committed = _sample()
    installed = copy.deepcopy(committed)
    change(installed["methods"]["sft"]["fields"])
    drift = validation_drift(committed, installed)
    assert any(line.startswith(expected) for line in drift), drift


def test_other_versions_are_named_in_one_line() -> None:
    committed = _sample()
    installed = dict(committed, trl_version="99.0.0")
    note = version_note(committed, installed)
    assert note is not None and "\n" not in note
    assert "trl" in note and "99.0.0" in note and "make snapshot docs" in note
    assert version_note(committed, committed) is None


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
