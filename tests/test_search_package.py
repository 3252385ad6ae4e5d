"""The search as its own package: nothing in it imports the controller's side, nothing in finetune touches
Optuna's private attributes, the one storage seam works on the installed Optuna, and its bounds are
pyproject's."""

from __future__ import annotations

import ast
import math
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_search_package_never_imports_the_layers_above_it_or_torch() -> None:
    for path in (ROOT / "finetune" / "search").glob("*.py"):
        above = {name for name in imported_modules(path)
                 if name.startswith(("finetune.schedule", "finetune.track", "finetune.train", "finetune.cli", "torch"))}
        assert not above, f"{path.name} imports {above}"


def test_no_private_optuna_attribute_is_read_anywhere() -> None:
    private = re.compile(r"\._storage\b|\._study_id\b|\._trial_id\b|optuna\.trial\.Trial\(")
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "finetune").rglob("*.py") if private.search(path.read_text())]
    assert offenders == []


def test_the_seam_s_bounds_are_pyproject_s_and_the_installed_optuna_is_within_them() -> None:
    optuna = pytest.importorskip("optuna")
    from finetune.search.optuna_storage import OPTUNA_BOUNDS, version_supported

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["optuna"]
    spec = next(item for item in extra if item.startswith("optuna"))
    low, high = OPTUNA_BOUNDS
    assert spec == f"optuna>={low[0]}.{low[1]},<{high[0]}", spec
    assert version_supported(optuna.__version__)
    assert not version_supported("3.6.1") and not version_supported("6.0.0")


def test_the_storage_seam_replaces_a_value_copies_system_attrs_and_finds_trials_by_number(tmp_path) -> None:
    optuna = pytest.importorskip("optuna")
    from finetune.search.optuna_storage import StudyFile

    file = StudyFile(tmp_path / "optuna.db")
    study = optuna.create_study(storage=file.storage, study_name="s")
    trial = study.ask()
    trial.report(2.0, step=1)
    file.replace_value(study, trial.number, 1, 1.5)  # Trial.report would ignore a second value at step 1
    file.copy_system_attrs(study, trial.number, {"cma:state": "x", "fixed_params": {"a": 1}})
    file.set_user_attr(study, trial.number, "rejected", "why")
    frozen = file.frozen(study, trial.number)
    assert frozen.intermediate_values == {1: 1.5} and frozen.system_attrs == {"cma:state": "x"}
    assert frozen.user_attrs == {"rejected": "why"} and file.state(study, trial.number) == "RUNNING"
    study.tell(trial, math.nan)
    assert file.state(study, trial.number) == "FAIL"
