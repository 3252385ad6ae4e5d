"""Interactive control requests (stop, resume, retry, delete, clone): which state each may act on,
how a clone is planned, and how the controller applies a request at a chunk boundary.

A request is checked twice with the same code: when it is submitted (`schedule.requests`, used by
`finetune ctl` and the dashboard), so that the user hears at once why it cannot be done, and when
the controller applies it, against the state of that moment. A request the controller cannot
apply ends `rejected: <reason>`; nothing in a request can stop the controller.

The controller is seen here only through `ControlTarget`. A stop takes effect at the end of the
chunk in training, before the run's next chunk starts; a delete also waits for the run's
checkpoints to be written.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from finetune.config.issues import ConfigIssue
from finetune.config.knobs import iter_knobs
from finetune.config.loading import ConfigLoadError, SourceDoc, apply_override, parse_override, translate_legacy_keys
from finetune.config.scheduling import EXPERIMENT_WIDE_KEYS
from finetune.config.validation import CONFIG_ADAPTER, validate_document
from finetune.data.files import data_paths
from finetune.plan.build import run_id_of
from finetune.plan.derive import DeriveError, derive
from finetune.plan.model import PlannedRun
from finetune.schedule.records import RunRecord, RunStatus

WARM_STARTS = "warm-starts"  # where a warm-start clone's adapter is copied, inside the experiment folder


class RequestKind(str, Enum):
    STOP = "stop"
    RESUME = "resume"
    RETRY = "retry"
    DELETE = "delete"
    CLONE = "clone"


# The one table of which run states each request acts on.
ACTS_ON: dict[RequestKind, frozenset[RunStatus]] = {
    RequestKind.STOP: frozenset({RunStatus.PENDING, RunStatus.RUNNING}),
    RequestKind.RESUME: frozenset({RunStatus.STOPPED}),
    RequestKind.RETRY: frozenset({RunStatus.FAILED}),
    RequestKind.DELETE: frozenset(set(RunStatus) - {RunStatus.DELETED}),
    RequestKind.CLONE: frozenset(RunStatus),
}
HINTS = {
    (RequestKind.RESUME, RunStatus.FAILED): "; `retry` continues a failed run from its last durable chunk",
    (RequestKind.RETRY, RunStatus.STOPPED): "; `resume` continues a stopped run",
}


class RequestRejected(ValueError):
    """A request that cannot be applied; `problems` are (config key path or "", message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" if path else message for path, message in problems))
        self.problems = problems


def request_kind(kind: str) -> RequestKind:
    try:
        return RequestKind(kind)
    except ValueError:
        raise RequestRejected([("", f"unknown request {kind!r}; one of {', '.join(k.value for k in RequestKind)}")]) from None


def check_state(kind: RequestKind, run_id: str, status: RunStatus) -> None:
    """Raise if `kind` cannot act on a run in `status`."""
    if status in ACTS_ON[kind]:
        return
    allowed = " or ".join(sorted(state.value for state in ACTS_ON[kind]))
    hint = HINTS.get((kind, status), "")
    raise RequestRejected([("", f"run {run_id} is {status.value}; {kind.value} acts on a {allowed} run{hint}")])


# ---------------------------------------------------------------- clones


@dataclass(frozen=True)
class CloneRequest:
    """A clone's payload, checked: `--set` changes and whether to start from the parent's adapter."""

    changes: tuple[str, ...]
    warm_start: bool
    continues: bool = False  # PBT's exploit: the clone takes over the parent's full durable state (not from `ctl`)

    @classmethod
    def parse(cls, payload: Any) -> CloneRequest:
        if not isinstance(payload, dict):
            raise RequestRejected([("", "a clone request is a mapping with `set` and `warm_start`")])
        changes, warm = payload.get("set", []), payload.get("warm_start", False)
        if not isinstance(changes, list) or not all(isinstance(change, str) for change in changes):
            raise RequestRejected([("set", "a list of KEY=VALUE strings")])
        if not isinstance(warm, bool):
            raise RequestRejected([("warm_start", "true or false")])
        return cls(tuple(changes), warm)


@dataclass(frozen=True)
class CloneParent:
    """What a clone needs of its parent (the controller's record, or a row of the state store)."""

    planned: PlannedRun
    status: RunStatus
    durable_chunks: int
    last_checkpoint: str | None

    @property
    def run_id(self) -> str:
        return self.planned.run_id

    @classmethod
    def of(cls, record: RunRecord) -> CloneParent:
        return cls(record.planned, record.status, record.durable_chunks, record.last_checkpoint)


def warm_start_dir(parent: CloneParent) -> str:
    """Where a warm start from `parent`'s latest chunk is kept, relative to the experiment folder."""
    return f"{WARM_STARTS}/{parent.run_id}-chunk{parent.durable_chunks}"


def plan_clone(parent: CloneParent, request: CloneRequest, existing: set[str]) -> PlannedRun:
    """The clone as a new run: its config validated like a config file, checked to be one run that
    changes nothing experiment-wide, and its derived values from the parent's data sizes (the
    controller derives them again from the clone's own data). Raises `RequestRejected`."""
    if request.warm_start:
        _check_warm_source(parent)
        if any(change.partition("=")[0].strip().startswith("peft_conf") for change in request.changes):
            raise RequestRejected([("peft_conf", "a warm start trains the parent's adapter as it is; change peft_conf "
                                                 "in a clone without --warm-start")])
    doc = SourceDoc(copy.deepcopy(parent.planned.config), "the clone request")
    try:
        for change in request.changes:
            apply_override(doc, change)
    except ConfigLoadError as error:
        raise RequestRejected([("", str(error))]) from None
    if request.warm_start:
        doc.tree["peft_conf"] = {"peft_type": "PRETRAINED_PEFT", "name_or_path": warm_start_dir(parent)}
    translate_legacy_keys(doc)
    _check_config(doc, parent.planned.config)
    validated = CONFIG_ADAPTER.validate_python(doc.tree)
    missing = [(path, f"{data} does not exist") for path, data in data_paths(validated) if Path(data).is_absolute()
               and not Path(data).exists()]
    if missing:
        raise RequestRejected(missing)
    run_id = run_id_of(doc.tree)
    if run_id in existing:
        raise RequestRejected([("", f"an identical run exists ({run_id})")])
    try:
        derived = derive(validated, parent.planned.derived.train_examples)
    except DeriveError as error:
        raise RequestRejected([("", str(error))]) from None
    from finetune.plan.expand import format_value

    changes = ",".join(f"{c.partition('=')[0].strip()}={format_value(parse_override(c)[1])}" for c in request.changes) or "copy"
    return PlannedRun(
        run_id=run_id,
        label=f"clone of {parent.run_id}: {changes}" + (" (warm)" if request.warm_start else ""),
        group=parent.planned.group,
        knobs={**parent.planned.knobs, **{c.partition("=")[0].strip(): parse_override(c)[1] for c in request.changes}},
        config=doc.tree,
        derived=derived,
        parent_run_id=parent.run_id,
        warm_start=_warm_start_of(doc.tree, parent, request),
        lineage_start=(parent.planned.lineage_start + parent.durable_chunks if request.warm_start
                       else parent.planned.lineage_start if request.continues else 0),
    )


def _warm_start_of(config: dict[str, Any], parent: CloneParent, request: CloneRequest) -> str | None:
    """The clone's warm start: a new one, or its parent's when the clone keeps the parent's adapter."""
    if request.warm_start:
        return warm_start_dir(parent)
    inherited = parent.planned.warm_start
    keeps = inherited is not None and (config.get("peft_conf") or {}).get("name_or_path") == inherited
    return inherited if keeps else None


def _check_warm_source(parent: CloneParent) -> None:
    if parent.status is RunStatus.DELETED:
        raise RequestRejected([("", "warm start copies the parent's checkpoint; the parent is deleted")])
    if not parent.last_checkpoint:
        raise RequestRejected([("", "warm start needs a durable chunk of the parent; it has none yet")])
    if CONFIG_ADAPTER.validate_python(parent.planned.config).peft_conf.peft_type == "NO_PEFT":
        raise RequestRejected([("", "warm start copies an adapter; the parent trains the full model")])


def _check_config(doc: SourceDoc, parent_config: dict[str, Any]) -> None:
    ours_custom = (doc.tree.get("eval_conf") or {}).get("custom") if isinstance(doc.tree.get("eval_conf"), dict) else None
    if ours_custom != (parent_config.get("eval_conf") or {}).get("custom"):  # user code is the experiment's, as its devices
        raise RequestRejected([("eval_conf.custom", "the custom metrics (user code) belong to the whole experiment; a "
                                                    "clone cannot add or change them")])
    issues = validate_document(doc)
    if issues:
        raise RequestRejected([(issue.path, _with_values(issue)) for issue in issues])
    knobs = [".".join(map(str, path)) for path, _ in iter_knobs(doc.tree)]
    if knobs or "groups" in doc.tree:
        raise RequestRejected([(knobs[0] if knobs else "groups", "a clone is one run: no knobs or groups")])
    ours, theirs = doc.tree.get("experiment") or {}, parent_config.get("experiment") or {}
    changed = [key for key in EXPERIMENT_WIDE_KEYS if ours.get(key) != theirs.get(key)]
    if changed:
        raise RequestRejected([(f"experiment.{key}", "belongs to the whole experiment; a clone cannot change it")
                               for key in changed])


def _with_values(issue: ConfigIssue) -> str:
    """The issue's message with what was given and what is allowed, as `finetune validate` shows them."""
    extra = [f"{label}: {value}" for label, value in (("given", issue.given), ("allowed", issue.allowed)) if value]
    return issue.message + (f" ({'; '.join(extra)})" if extra else "")


def keep_warm_start(root: Path, parent: CloneParent, relative: str) -> None:
    """Copy the parent's latest checkpoint where chunk clean-up will not delete it."""
    assert parent.last_checkpoint is not None
    target = root / relative
    if target.is_dir():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(parent.last_checkpoint, tmp)
    tmp.rename(target)


# ---------------------------------------------------------------- applying a request


class ControlTarget(Protocol):
    """What interactive control needs of the controller."""

    root: Path

    def record(self, run_id: str) -> RunRecord | None: ...
    def run_ids(self) -> set[str]: ...
    def training(self, run_id: str) -> bool: ...
    def busy(self, run_id: str) -> bool: ...
    def set_status(self, run_id: str, status: RunStatus) -> None: ...
    def prepare(self, run: PlannedRun) -> PlannedRun: ...
    def add_run(self, run: PlannedRun) -> None: ...
    def inherit(self, run: PlannedRun, parent: CloneParent) -> None: ...


def apply_request(target: ControlTarget, kind: str, run_id: str, payload: Any) -> str | None:
    """Apply one request; returns its status (`applied...` or `rejected: reason`), or None to retry at
    the run's next chunk boundary."""
    try:
        return _apply(target, request_kind(kind), run_id, payload)
    except RequestRejected as rejected:
        return f"rejected: {rejected}"


def _apply(target: ControlTarget, kind: RequestKind, run_id: str, payload: Any) -> str | None:
    record = target.record(run_id)
    if record is None:
        raise RequestRejected([("", f"no run {run_id}")])
    check_state(kind, run_id, record.status)
    if kind is RequestKind.CLONE:
        return _clone(target, record, CloneRequest.parse(payload))
    if kind is RequestKind.STOP and target.training(run_id) or kind is RequestKind.DELETE and target.busy(run_id):
        return None
    if kind is RequestKind.STOP:
        target.set_status(run_id, RunStatus.STOPPED)
    elif kind in (RequestKind.RESUME, RequestKind.RETRY):
        target.set_status(run_id, RunStatus.PENDING)
    else:
        target.set_status(run_id, RunStatus.DELETED)
        shutil.rmtree(target.root / "runs" / run_id, ignore_errors=True)
    return "applied"


def _clone(target: ControlTarget, record: RunRecord, request: CloneRequest) -> str:
    clone = add_clone(target, CloneParent.of(record), request)
    return f"applied: new run {clone.run_id}"


def add_clone(target: ControlTarget, parent: CloneParent, request: CloneRequest) -> PlannedRun:
    """The clone planned, prepared and added to the experiment (its warm start copied first); the
    one path of `ctl clone` and of population-based training. Raises `RequestRejected`."""
    clone = target.prepare(plan_clone(parent, request, target.run_ids()))
    if request.continues:
        _check_continuation(parent, clone)
        target.inherit(clone, parent)  # its first chunks are the parent's, its state the parent's last durable one
    if clone.warm_start is not None:
        try:
            keep_warm_start(target.root, parent, clone.warm_start)
        except OSError as error:
            raise RequestRejected([("warm_start", f"the parent's checkpoint could not be copied ({error})")]) from None
    target.add_run(clone)
    return clone


def _check_continuation(parent: CloneParent, clone: PlannedRun) -> None:
    """A clone that continues its parent's state trains the same schedule on the same data from there."""
    if not parent.last_checkpoint:
        raise RequestRejected([("", "continuing a run needs a durable chunk of it; it has none yet")])
    if (clone.derived.chunk_steps or []) != (parent.planned.derived.chunk_steps or []):
        raise RequestRejected([("", f"the clone's chunks ({clone.derived.chunk_steps}) are not its parent's "
                                    f"({parent.planned.derived.chunk_steps}): it cannot continue the parent's state")])
