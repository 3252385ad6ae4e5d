"""Interactive control requests (stop, resume, delete, clone), applied by the controller at chunk boundaries."""

from __future__ import annotations

import copy
import shutil
from typing import Any

from finetune.config.knobs import set_at
from finetune.config.loading import ConfigLoadError, parse_override
from finetune.config.validation import validate_concrete
from finetune.plan.build import run_id_of
from finetune.plan.derive import DeriveError, derive
from finetune.plan.model import PlannedRun
from finetune.train.preflight import check_distributed

CONTROL_KINDS = ("stop", "resume", "delete", "clone")


def apply_request(controller: Any, kind: str, run_id: str, payload: dict[str, Any]) -> str | None:
    """Apply one request; returns its status, or None to retry at the run's next chunk boundary."""
    store = controller.store
    try:
        row = store.run(run_id)
    except KeyError:
        return f"rejected: no run {run_id}"
    if kind == "stop":
        if row.state not in ("pending", "running"):
            return f"rejected: the run is {row.state}"
        if controller.busy(run_id):
            return None
        store.set_state(run_id, "stopped")
        return "applied"
    if kind == "resume":
        if row.state != "stopped":
            return f"rejected: the run is {row.state}, not stopped"
        store.set_state(run_id, "pending")
        return "applied"
    if kind == "delete":
        if controller.busy(run_id):
            return None
        store.set_state(run_id, "deleted")
        shutil.rmtree(controller.root / "runs" / run_id, ignore_errors=True)
        return "applied"
    if kind == "clone":
        return _clone(controller, row, payload)
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


def _keep_warm_start(root: Any, row: Any) -> str:
    """Copy the parent's latest checkpoint where chunk clean-up will not delete it."""
    target = (root / "warm-starts" / f"{row.run_id}-chunk{row.chunks_done}").resolve()
    if not target.is_dir():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(row.last_checkpoint, tmp)
        tmp.rename(target)
    return str(target)


def _clone(controller: Any, row: Any, payload: dict[str, Any]) -> str:
    parent = controller._planned(row.run_id)
    warm = bool(payload.get("warm_start"))
    if warm and not row.last_checkpoint:
        return "rejected: warm start needs a finished chunk of the parent"
    if warm and parent.config.get("peft_conf", {}).get("peft_type") == "NO_PEFT":
        return "rejected: warm start copies an adapter; the parent has none"
    warm_from = _keep_warm_start(controller.root, row) if warm else None
    try:
        config = clone_config(parent, list(payload.get("set", [])), warm_from)
    except ConfigLoadError as error:
        return f"rejected: {error}"
    validated, issues = validate_concrete(config, lambda path: "--set")  # type: ignore[arg-type,return-value]
    if validated is None:
        return "rejected: " + "; ".join(f"{issue.path}: {issue.message}" for issue in issues)
    run_id = run_id_of(config)
    if controller._planned(run_id) is not None:
        return f"rejected: an identical run exists ({run_id})"
    devices = controller.pool.devices if validated.experiment.backend == "local" else None
    problems = check_distributed(validated, devices)
    if problems:
        return "rejected: " + "; ".join(f"{path}: {problem}" for path, problem in problems)
    try:
        derived = derive(validated, parent.derived.train_examples)
    except DeriveError as error:
        return f"rejected: {error}"
    changes = ",".join(payload.get("set", [])) or "copy"
    clone = PlannedRun(
        run_id=run_id,
        label=f"clone of {row.run_id}: {changes}" + (" (warm)" if warm else ""),
        group=parent.group,
        knobs={**parent.knobs, **{c.partition('=')[0]: c.partition('=')[2] for c in payload.get("set", [])}},
        config=config,
        derived=derived,
        parent_run_id=row.run_id,
    )
    controller.add_run(clone)
    return f"applied: new run {run_id}"


