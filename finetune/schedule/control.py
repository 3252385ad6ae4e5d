"""Interactive control requests (stop, resume, delete, clone), applied by the controller at chunk boundaries.

The controller is seen here only through `ControlTarget`: its records, whether a run is training
(or busy: training, or a trained chunk not yet on disk), a state change (checked there like any
other), and adding a run. A stop takes effect at the end of the chunk in training, before the run's
next chunk starts; a delete also waits for the run's checkpoints to be written.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Protocol

from finetune.config.knobs import set_at
from finetune.config.loading import ConfigLoadError, parse_override
from finetune.config.scheduling import EXPERIMENT_WIDE_KEYS
from finetune.config.validation import validate_concrete
from finetune.plan.build import run_id_of
from finetune.plan.derive import DeriveError, derive
from finetune.plan.model import PlannedRun
from finetune.schedule.records import RunRecord, RunStatus
from finetune.train.preflight import check_distributed

CONTROL_KINDS = ("stop", "resume", "delete", "clone")


class ControlTarget(Protocol):
    """What interactive control needs of the controller."""

    root: Path

    def record(self, run_id: str) -> RunRecord | None: ...
    def training(self, run_id: str) -> bool: ...
    def busy(self, run_id: str) -> bool: ...
    def set_status(self, run_id: str, status: RunStatus) -> None: ...
    def add_run(self, run: PlannedRun) -> None: ...
    def local_devices(self) -> list[str] | None: ...


def apply_request(target: ControlTarget, kind: str, run_id: str, payload: dict[str, Any]) -> str | None:
    """Apply one request; returns its status, or None to retry at the run's next chunk boundary."""
    record = target.record(run_id)
    if record is None:
        return f"rejected: no run {run_id}"
    state = record.status.value
    if kind == "stop":
        if not record.active:
            return f"rejected: the run is {state}; only a pending or running run can be stopped"
        if target.training(run_id):
            return None
        target.set_status(run_id, RunStatus.STOPPED)
        return "applied"
    if kind == "resume":
        if record.status not in (RunStatus.STOPPED, RunStatus.FAILED):
            return f"rejected: the run is {state}; only a stopped or failed run can be resumed"
        target.set_status(run_id, RunStatus.PENDING)
        return "applied"
    if kind == "delete":
        if record.status is RunStatus.DELETED:
            return "rejected: the run is already deleted"
        if target.busy(run_id):
            return None
        target.set_status(run_id, RunStatus.DELETED)
        shutil.rmtree(target.root / "runs" / run_id, ignore_errors=True)
        return "applied"
    if kind == "clone":
        return _clone(target, record, payload)
    return f"rejected: unknown request {kind}"


def clone_config(parent: PlannedRun, changes: list[str], warm_from: str | None) -> dict[str, Any]:
    config = copy.deepcopy(parent.config)
    for change in changes:
        path, value = parse_override(change)
        config = set_at(_with_parents(config, path), path, value)
    if warm_from is not None:
        config["peft_conf"] = {"peft_type": "PRETRAINED_PEFT", "name_or_path": warm_from}
    return config


def _with_parents(tree: dict[str, Any], path: tuple) -> dict[str, Any]:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    return tree


def _experiment_keys(path: tuple, value: Any) -> list[Any]:
    """The keys of `experiment` that a `--set path=value` change sets."""
    if not path or path[0] != "experiment":
        return []
    if len(path) > 1:
        return [path[1]]
    return list(value) if isinstance(value, dict) else []


def _keep_warm_start(root: Path, record: RunRecord) -> str:
    """Copy the parent's latest checkpoint where chunk clean-up will not delete it."""
    assert record.last_checkpoint is not None
    target = (root / "warm-starts" / f"{record.run_id}-chunk{record.durable_chunks}").resolve()
    if not target.is_dir():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(record.last_checkpoint, tmp)
        tmp.rename(target)
    return str(target)


def _clone(target: ControlTarget, record: RunRecord, payload: dict[str, Any]) -> str:
    parent = record.planned
    warm = bool(payload.get("warm_start"))
    if warm and record.status is RunStatus.DELETED:
        return "rejected: warm start copies the parent's checkpoint; the parent is deleted"
    if warm and not record.last_checkpoint:
        return "rejected: warm start needs a finished chunk of the parent"
    if warm and record.config.peft_conf.peft_type == "NO_PEFT":
        return "rejected: warm start copies an adapter; the parent has none"
    try:
        changes = [parse_override(change) for change in payload.get("set", [])]
    except ConfigLoadError as error:
        return f"rejected: {error}"
    shared = [f"experiment.{key}" for path, value in changes for key in _experiment_keys(path, value) if key in EXPERIMENT_WIDE_KEYS]
    if shared:
        return f"rejected: {', '.join(shared)} belong(s) to the whole experiment; a clone cannot change it"
    try:
        warm_from = _keep_warm_start(target.root, record) if warm else None
    except OSError as error:
        return f"rejected: the parent's checkpoint could not be copied for the warm start ({error})"
    try:
        config = clone_config(parent, list(payload.get("set", [])), warm_from)
    except ConfigLoadError as error:
        return f"rejected: {error}"
    validated, issues = validate_concrete(config, lambda path: "--set")  # type: ignore[arg-type,return-value]
    if validated is None:
        return "rejected: " + "; ".join(f"{issue.path}: {issue.message}" for issue in issues)
    run_id = run_id_of(config)
    if target.record(run_id) is not None:
        return f"rejected: an identical run exists ({run_id})"
    problems = check_distributed(validated, target.local_devices())
    if problems:
        return "rejected: " + "; ".join(f"{path}: {problem}" for path, problem in problems)
    try:
        derived = derive(validated, parent.derived.train_examples)
    except DeriveError as error:
        return f"rejected: {error}"
    changes = ",".join(payload.get("set", [])) or "copy"
    clone = PlannedRun(
        run_id=run_id,
        label=f"clone of {record.run_id}: {changes}" + (" (warm)" if warm else ""),
        group=parent.group,
        knobs={**parent.knobs, **{c.partition('=')[0]: c.partition('=')[2] for c in payload.get("set", [])}},
        config=config,
        derived=derived,
        parent_run_id=record.run_id,
    )
    target.add_run(clone)
    return f"applied: new run {run_id}"


