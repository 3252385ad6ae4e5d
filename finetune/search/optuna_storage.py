"""The one place finetune touches Optuna below `Study`'s own methods: its study file, through the storage
object created here.

Optuna's public `Study`/`Trial` API covers asking, telling and adding trials, but three things a study whose
trials are chunked runs needs are only on the storage (`optuna.storages.BaseStorage`, a documented public
interface; the object is the one `StudyFile` creates, so no private attribute of `Study` or `Trial` (the
study's storage, its study id, a trial's id) is read):

- `replace_value`: a run resumed after a kill reports a chunk's value again for the same step; `Trial.report`
  ignores a second report of a step (with a warning), the storage's `set_trial_intermediate_value` replaces it.
- `copy_system_attrs`: the CMA-ES sampler keeps its state in a trial's system attributes; the trial the study
  asks must carry those of the trial its view proposed, and `Trial.set_system_attr` was removed in Optuna 3.
- `set_user_attr` on a trial known only by its number (a proposal rejected after the trial was asked), and a
  trial's state by number (`trial_id`/`state`): `Study` looks trials up only as lists.

Bounds: `pyproject.toml`'s `optuna` extra (>=4.0,<6): `BaseStorage`'s methods used here exist with these
signatures in 4.x and 5.x (tests/test_search_optuna_storage.py checks the installed version against them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

OPTUNA_BOUNDS = ((4, 0), (6, 0))  # >= lower, < upper: pyproject's optuna extra says the same


def version_supported(version: str) -> bool:
    parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return OPTUNA_BOUNDS[0] <= parts < OPTUNA_BOUNDS[1]


class StudyFile:
    """A study in an SQLite file, and the storage calls the search makes on it."""

    def __init__(self, path: Path) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.path = path
        self.storage = optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 30}})

    def study_id(self, study: optuna.Study) -> int:
        return self.storage.get_study_id_from_name(study.study_name)

    def trial_id(self, study: optuna.Study, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id(study), number)

    def state(self, study: optuna.Study, number: int) -> str:
        return self.storage.get_trial(self.trial_id(study, number)).state.name

    def frozen(self, study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
        return self.storage.get_trial(self.trial_id(study, number))

    def replace_value(self, study: optuna.Study, number: int, step: int, value: float) -> None:
        """The trial's intermediate value at `step`, replacing one reported before a restart."""
        self.storage.set_trial_intermediate_value(self.trial_id(study, number), step, value)

    def copy_system_attrs(self, study: optuna.Study, number: int, attrs: dict[str, Any]) -> None:
        trial_id = self.trial_id(study, number)
        for key, value in attrs.items():
            if key != "fixed_params":
                self.storage.set_trial_system_attr(trial_id, key, value)

    def set_user_attr(self, study: optuna.Study, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self.trial_id(study, number), key, value)
